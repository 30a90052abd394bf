"""On the CPU, compute threads + loader workers stay within the CPUs the process may use."""

import torch

from nola_core import runtime
import pytest

from nola_core.runtime import CPU_THREADS_ENV, available_cpus, cpu_thread_budget, cpu_threads_setting, loader_workers

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
    monkeypatch.setattr(runtime, "available_cpus", lambda: 8)
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        with cpu_thread_budget(CPU, loader_workers=2) as threads:
            assert threads == torch.get_num_threads() == 6
        assert torch.get_num_threads() == 8
        with cpu_thread_budget(CPU, loader_workers=0, processes=2) as threads:  # two gloo ranks share the CPUs
            assert threads == torch.get_num_threads() == 4
        with cpu_thread_budget(CPU, loader_workers=1, processes=4) as threads:  # a rank of 4 on this node
            assert threads == torch.get_num_threads() == 1
        with cpu_thread_budget(CPU, loader_workers=9) as threads:
            assert threads == 1
        with cpu_thread_budget(GPU, loader_workers=2) as threads:
            assert threads == torch.get_num_threads() == 8
        with cpu_thread_budget(CPU, loader_workers=2, threads=3) as threads:  # ComputeSettings.cpu_threads
            assert threads == torch.get_num_threads() == 3
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)


def test_cpu_loader_workers_take_at_most_a_quarter_of_the_cpus(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
    assert loader_workers(CPU, 2) == 0 and loader_workers(GPU, 2) == 2
    monkeypatch.setattr(runtime, "available_cpus", lambda: 16)
    assert loader_workers(CPU, 2) == 2 and loader_workers(CPU, 8) == 4


def test_cpu_threads_are_read_at_the_edges_and_passed_down(monkeypatch):
    """NOLA_CPU_THREADS is parsed where the environment is read (`cpu_threads_setting`, the Dagster
    resource) and reaches the loops as `ComputeSettings.cpu_threads`; the core reads no variable."""
    from nola_assets.resources import ComputeResource, MethodResource

    assert cpu_threads_setting(None) is None and cpu_threads_setting(" ") is None
    assert cpu_threads_setting("3") == 3 and cpu_threads_setting("0") == 1
    with pytest.raises(ValueError, match=f"{CPU_THREADS_ENV}='two'"):
        cpu_threads_setting("two")
    monkeypatch.setenv(CPU_THREADS_ENV, "3")
    compute = ComputeResource()
    assert compute.feature_config().compute.cpu_threads == 3
    assert MethodResource().tuning_config(compute).compute.cpu_threads == 3
    monkeypatch.setattr(runtime, "available_cpus", lambda: 8)
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        with cpu_thread_budget(CPU, loader_workers=2) as threads:  # the variable alone changes nothing here
            assert threads == 6
    finally:
        torch.set_num_threads(before)
