"""Progress of long stages: rate and time left, log lines at a bounded rate, a bar only on a terminal."""

import io

from nola_core.progress import Progress, progress_callback, progress_line, terminal_progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_carry_rate_and_time_left_at_a_bounded_rate():
    clock, lines = Clock(), []
    progress = Progress("dino features", 1000, "images", lines.append, interval_s=30, clock=clock)
    for second in range(1, 101):  # 10 images a second, one update a second
        clock.now = float(second)
        progress.update(10 * second)
    assert len(lines) == 5  # t=1, 31, 61, 91 and the last: not one per update
    assert lines[1] == "dino features: 310/1000 images (31%), 10.0 images/s, 1:09 left"
    assert lines[-1] == "dino features: 1000/1000 images (100%), 10.0 images/s, done in 1:40"


def test_rate_counts_only_the_work_done_since_the_clock_started():
    # Resumed at epoch 40 of 50: two epochs in 10 s is 0.2 epochs/s, 40 s left, not 42/10 epochs/s.
    assert progress_line("prompt tuning", 42, 50, "epochs", 10.0, "loss 0.5000", start=40) == (
        "prompt tuning: 42/50 epochs (84%), 0.2 epochs/s, 0:40 left, loss 0.5000")


def test_no_bar_and_no_control_characters_unless_the_stream_is_a_terminal():
    pipe = io.StringIO()
    with terminal_progress(pipe) as on:
        callback = progress_callback("clip features", "images")
        for done in range(0, 101, 10):
            callback(done, 100)
    assert not on and pipe.getvalue() == ""

    terminal = FakeTerminal()
    with terminal_progress(terminal) as on:
        callback = progress_callback("clip features", "images")
        for done in range(0, 101, 10):
            callback(done, 100, loss=0.25)
    assert on and "\r" in terminal.getvalue() and "100/100" in terminal.getvalue()

    outside = Progress("x", 10, "images")  # no terminal_progress around it: no bar anywhere
    assert outside.bar is None


def test_the_bar_reaches_stages_run_by_an_in_process_dagster_run(tmp_path):
    from assets_helpers import copy_demo, materialize_partition, resources_for_test
    from nola_assets.assets import dataset_manifest

    copy_demo(tmp_path / "data", "fashion_mini", labeled=False)
    terminal = FakeTerminal()
    with terminal_progress(terminal):
        materialize_partition(resources_for_test(tmp_path / "data", tmp_path / "artifacts"),
                              [dataset_manifest], "fashion_mini")
    assert "hashing unlabeled/" in terminal.getvalue() and "120/120" in terminal.getvalue()
