"""Progress of the long offline loops (eval sampling and features, dataset convert, ENFE timing, OOD energies, the
p0 fit, the feature classifier's training), shown the way the place it is read wants it.

On a terminal (stderr is a tty) ``progress`` is a ``tqdm`` bar. Anywhere else (a job log, a Ray worker's log file)
it prints plain, flushed lines to stderr, never carriage returns:

    [eval: sampling] 40/100 batches (40%), 12.3 s elapsed, ETA 18 s

one at every ``every_frac`` of the total or every ``every_s`` seconds, whichever comes first (at most one per
``min_interval_s``), and a last one when the loop ends. It only observes the loop: every item is yielded
unchanged, and it touches no random number generator. Callers that may run inside Ray eval actors take an opt-in
``progress`` flag (off by default) that the CLI turns on. ``HDEBM_RAY_PROGRESS=0`` silences all of it;
``HDEBM_RAY_PROGRESS=plain`` prints plain lines on a terminal too.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
ENV = "HDEBM_RAY_PROGRESS"


def mode(enabled: bool = True) -> str:
    """How progress is shown now: ``off``, ``tqdm`` (stderr is a terminal) or ``plain``."""
    setting = os.environ.get(ENV, "").strip().lower()
    if not enabled or setting in ("0", "off", "false", "no"):
        return "off"
    if setting == "plain":
        return "plain"
    isatty = getattr(sys.stderr, "isatty", None)
    return "tqdm" if isatty is not None and isatty() else "plain"


def hms(seconds: float) -> str:
    """Seconds as h:mm:ss (e.g. ``1:02:03``)."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def duration(seconds: float) -> str:
    """A short duration: ``12.3 s`` under a minute, else h:mm:ss."""
    return f"{seconds:.1f} s" if seconds < 60 else hms(seconds)


def plain_line(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """``[desc] 40/100 batches (40%), 12.3 s elapsed, ETA 18 s`` (no total: no percentage, no ETA)."""
    if not total:
        return f"[{desc}] {done} {unit}, {duration(elapsed)} elapsed"
    line = f"[{desc}] {done}/{total} {unit} ({100 * done / total:.0f}%), {duration(elapsed)} elapsed"
    if done >= total:
        return line + ", done"
    if done:
        line += f", ETA {duration(elapsed / done * (total - done))}"
    return line


def write(line: str, file=None) -> None:
    """A message line (flushed; default: on stdout, as ``print``) that does not break a running tqdm bar."""
    file = file or sys.stdout
    if mode() == "tqdm":
        from tqdm import tqdm

        tqdm.write(line, file=file)
    else:
        _emit(line, file)


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    every_frac: float = 0.1,
    every_s: float = 30.0,
    min_interval_s: float = 1.0,
    leave: bool = True,
    size: Callable[[T], int] | None = None,
) -> Iterator[T]:
    """Yield the items of ``iterable`` while showing progress on stderr (see the module docstring).

    ``total``: the number of items (default ``len(iterable)`` where it has one). ``enabled=False`` (or
    ``HDEBM_RAY_PROGRESS=0``) yields the items and prints nothing. ``leave=False``: the tqdm bar is cleared at the
    end (inner loops); plain mode always prints its last line. ``size``: how many units an item counts for (a
    batch of images: its length), when ``total`` counts units rather than items.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    how = mode(enabled)
    if how == "off":
        yield from iterable
        return
    if how == "tqdm":
        from tqdm import tqdm

        if size is None:
            yield from tqdm(
                iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=leave
            )
            return
        with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=leave) as bar:
            for item in iterable:
                yield item
                bar.update(size(item))
        return
    start = last = time.monotonic()
    next_frac, done = every_frac, 0
    for item in iterable:
        yield item
        done += 1 if size is None else size(item)
        now = time.monotonic()
        frac = done / total if total else 0.0
        due = (total and frac + 1e-9 >= next_frac) or now - last >= every_s
        if due and now - last >= min_interval_s and not (total and done >= total):
            _emit(plain_line(desc, done, total, unit, now - start))
            last = now
            if total:
                next_frac = (math.floor(frac / every_frac + 1e-9) + 1) * every_frac
    _emit(plain_line(desc, done, total, unit, time.monotonic() - start) + ("" if total else ", done"))


def _emit(line: str, file=None) -> None:
    file = file or sys.stderr
    file.write(line + "\n")
    file.flush()
