"""What a person sees while a run goes: a short header, one progress display per phase,
and a closing table. mmengine's own output (environment dump, resolved config, a
line per logging interval) goes to the run directory's log file only, unless
``--verbose``.

On a terminal the phases are live rich progress bars; elsewhere (CI logs, Slurm
output files) they are plain lines at most every 5% of a phase, and tables are
printed at their full width, never wrapped.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Iterator, TextIO

from rich.console import Console
from rich.table import Table


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunConsole:
    """Progress and summary output for a run; ``out`` defaults to the real stdout."""

    def __init__(self, out: TextIO | None = None, verbose: bool = False, force_plain: bool | None = None):
        self.out = out or sys.stdout
        self.verbose = verbose
        tty = self.out.isatty() if hasattr(self.out, "isatty") else False
        self.plain = (not tty) if force_plain is None else force_plain
        # plain consoles never wrap: a table keeps its full width, one row per line
        self.console = Console(file=self.out, force_terminal=not self.plain, no_color=self.plain,
                               width=None if not self.plain else 10_000, highlight=False, soft_wrap=self.plain)
        self._progress = None
        self._tasks: dict[str, Any] = {}
        self._plain_state: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------ messages
    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        self.console.print(f"WARNING: {text}", markup=False, highlight=False, soft_wrap=True,
                           style=None if self.plain else "yellow")

    def header(self, rows: list[tuple[str, str]]) -> None:
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            self.line(f"{k:<{width}}  {v}")

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        t = Table(title=title, show_lines=False, title_justify="left")
        for c in columns:
            t.add_column(c, no_wrap=True, overflow="ignore" if self.plain else "fold")
        for r in rows:
            t.add_row(*r)
        self.console.print(t)

    # ------------------------------------------------------------- phases
    def start(self, key: str, label: str, total: int, completed: int = 0, plain_lines: bool = True) -> None:
        """A phase of ``total`` steps. Plain output prints a line at most every 5% of it
        (``plain_lines``), or nothing until its summary (short phases: data checks, evaluations)."""
        if self.plain:
            self._plain_state[key] = {"total": total, "t0": time.time(), "c0": completed,
                                      "last": completed, "label": label, "lines": plain_lines}  # type: ignore[dict-item]
            if plain_lines:
                self.line(f"{label}: {completed}/{total}")
            return
        if self._progress is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            # the fixed-width columns first, the loss / lr text last: on a narrow terminal only it is cut
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24),
                                      MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      console=self.console, transient=False)
            self._progress.start()
        self._tasks[key] = self._progress.add_task(label, total=total, completed=completed, info="")

    def advance(self, key: str, done: int, info: str = "") -> None:
        if self.plain:
            st = self._plain_state.get(key)
            if st is None:
                return
            if not st["lines"]:
                return
            step = max(1, int(st["total"]) // 20)
            if done - st["last"] >= step or done >= st["total"]:
                st["last"] = done
                elapsed = time.time() - st["t0"]
                rate = (done - st["c0"]) / elapsed if elapsed > 0 else 0.0
                eta = (st["total"] - done) / rate if rate > 0 else 0.0
                self.line(f"{st['label']}: {done}/{int(st['total'])}  {info}  {rate:.2f} it/s  "
                          f"elapsed {_fmt_time(elapsed)}  ETA {_fmt_time(eta)}".replace("    ", "  "))
            return
        if self._progress is not None and key in self._tasks:
            self._progress.update(self._tasks[key], completed=done, info=info)

    def finish(self, key: str, summary: str | None = None) -> None:
        if self.plain:
            self._plain_state.pop(key, None)
        elif self._progress is not None and key in self._tasks:
            self._progress.refresh()
            self._progress.remove_task(self._tasks.pop(key))
            if not self._tasks:
                self._progress.stop()
                self._progress = None
        if summary:
            self.line(summary)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # ----------------------------------------------- library output control
    @contextlib.contextmanager
    def quiet_libraries(self) -> Iterator[None]:
        """Send what mmengine, pycocotools & co. print to stdout elsewhere (the run log has it).

        mmengine's console handler keeps the stream it saw when the runner was built, so
        building the runner inside this context silences it for the whole run."""
        if self.verbose:
            yield
            return
        with contextlib.redirect_stdout(_devnull()):
            yield


_DEVNULL: TextIO | None = None


def _devnull() -> TextIO:
    """One sink for the process, never closed: handlers built while stdout pointed at it keep it."""
    global _DEVNULL
    if _DEVNULL is None:
        _DEVNULL = open(os.devnull, "w")
    return _DEVNULL

