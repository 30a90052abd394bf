"""Progress of long stages (feature extraction, training epochs): rate and time left.

`Progress` serves two readers at once:

- logs (Dagster step logs, CI): a line at most every `LOG_INTERVAL_S` seconds, plus the first
  and the last, never one per batch: "dino features: 5000/100000 images (5%), 312.4 images/s,
  5:04 left";
- a person at a terminal: a tqdm bar (tqdm comes with dagster, open_clip and huggingface_hub),
  only inside `terminal_progress(stream)` and only when that stream is a terminal, so logs
  and CI output never get control characters.

`terminal_progress` sets a context variable, not a global: the bar shows for stages run in
that context (the CLI's in-process Dagster run) and nowhere else.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Callable, Iterator, TextIO

LOG_INTERVAL_S = 30.0
"""At most one progress log line per stage every 30 s (the first and last always)."""

_terminal: contextvars.ContextVar[TextIO | None] = contextvars.ContextVar("nola_progress_terminal", default=None)


@contextlib.contextmanager
def terminal_progress(stream: TextIO | None = None) -> Iterator[bool]:
    """Show progress bars on `stream` (default stdout) for the stages run inside, if it is a
    terminal. Yields whether bars are on."""
    stream = sys.stdout if stream is None else stream
    on = bool(getattr(stream, "isatty", lambda: False)())
    token = _terminal.set(stream if on else None)
    try:
        yield on
    finally:
        _terminal.reset(token)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(what: str, done: int, total: int, unit: str, elapsed_s: float, postfix: str = "",
                  start: int = 0) -> str:
    """"what: done/total unit (p%), r unit/s, m:ss left[, postfix]"; the rate counts the units done
    since `start` (those done before the clock started, e.g. resumed epochs, are not in it)."""
    text = f"{what}: {done}/{total} {unit} ({100 * done / max(total, 1):.0f}%)"
    if done > start and elapsed_s > 0:
        rate = (done - start) / elapsed_s
        text += f", {rate:.1f} {unit}/s" if rate >= 1 else f", {rate:.3g} {unit}/s"
        if done < total:
            text += f", {format_duration((total - done) / rate)} left"
        else:
            text += f", done in {format_duration(elapsed_s)}"
    return f"{text}, {postfix}" if postfix else text


class Progress:
    """One stage: `update(done, **postfix)` as work completes, `close()` at the end (or use it
    as a context manager)."""

    def __init__(self, what: str, total: int, unit: str, log: Callable[[str], None] | None = None,
                 interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 start: int = 0) -> None:
        self.what, self.total, self.unit, self.log, self.interval_s, self.clock = what, total, unit, log, interval_s, clock
        self.start = start  # units already done when the clock starts
        self.started = clock()
        self.last_logged: float | None = None
        self.bar = None
        stream = _terminal.get()
        if stream is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit=f" {unit}", desc=what, file=stream, dynamic_ncols=True)

    def update(self, done: int, **postfix: float | str) -> None:
        text = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if text:
                self.bar.set_postfix_str(text, refresh=False)
        now = self.clock()
        due = self.last_logged is None or now - self.last_logged >= self.interval_s or done >= self.total
        if self.log is not None and due:
            self.last_logged = now
            self.log(progress_line(self.what, done, self.total, self.unit, now - self.started, text, self.start))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_callback(what: str, unit: str, log: Callable[[str], None] | None = None,
                      interval_s: float = LOG_INTERVAL_S) -> Callable[..., None]:
    """`callback(done, total, **postfix)` for code that reports (done, total) as it goes (feature
    extraction, training loops): a `Progress` started at the first call (its rate counts from
    there), closed when done reaches total."""
    state: dict[str, Progress] = {}

    def callback(done: int, total: int, **postfix: float | str) -> None:
        if "progress" not in state:
            state["progress"] = Progress(what, total, unit, log, interval_s, start=done)
        state["progress"].update(done, **postfix)
        if done >= total:
            state.pop("progress").close()

    return callback
