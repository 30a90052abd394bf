"""On the CPU, compute threads + loader workers stay within the CPUs the process may use."""

import torch

from nola_core import runtime
from nola_core.runtime import CPU_THREADS_ENV, available_cpus, cpu_thread_budget, loader_workers

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_a_container_cpu_quota_caps_the_cpus(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # docker run --cpus 1.5
    assert available_cpus(v2) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    assert available_cpus(v2) == available_cpus(tmp_path / "none") >= 1
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path / "v1") == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(tmp_path / "v1") == available_cpus(tmp_path / "none")


def test_the_thread_budget_lowers_and_restores_the_count_on_the_cpu_only(monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    monkeypatch.setattr(runtime, "available_cpus", lambda: 8)
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        with cpu_thread_budget(CPU, loader_workers=2) as threads:
            assert threads == torch.get_num_threads() == 6
        assert torch.get_num_threads() == 8
        with cpu_thread_budget(CPU, loader_workers=0, processes=2) as threads:  # two gloo ranks share the CPUs
            assert threads == torch.get_num_threads() == 4
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # what torchrun / distributed.launch set in each rank
        with cpu_thread_budget(CPU, loader_workers=1) as threads:
            assert threads == torch.get_num_threads() == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        with cpu_thread_budget(CPU, loader_workers=9) as threads:
            assert threads == 1
        with cpu_thread_budget(GPU, loader_workers=2) as threads:
            assert threads == torch.get_num_threads() == 8
        monkeypatch.setenv(CPU_THREADS_ENV, "3")
        with cpu_thread_budget(CPU, loader_workers=2) as threads:
            assert threads == torch.get_num_threads() == 3
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)


def test_cpu_loader_workers_take_at_most_a_quarter_of_the_cpus(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
    assert loader_workers(CPU, 2) == 0 and loader_workers(GPU, 2) == 2
    monkeypatch.setattr(runtime, "available_cpus", lambda: 16)
    assert loader_workers(CPU, 2) == 2 and loader_workers(CPU, 8) == 4
