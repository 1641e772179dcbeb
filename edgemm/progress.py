"""Progress bars for long work: rich bars on a terminal, a few plain log lines otherwise (CI, pipes)."""

from __future__ import annotations

import contextlib
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_err = Console(stderr=True)


class _Plain:
    def __init__(self, total: int, desc: str, quiet: bool):
        self.total, self.desc, self.quiet = max(total, 1), desc, quiet
        self.n, self.next_pct, self.t0 = 0, 10, time.time()
        self.info = ""

    def advance(self, n: int = 1, info: str = ""):
        self.n += n
        self.info = info or self.info
        pct = 100 * self.n // self.total
        if not self.quiet and pct >= self.next_pct:
            print(f"{self.desc}: {self.n}/{self.total} ({pct}%, {time.time() - self.t0:.0f}s) {self.info}",
                  file=sys.stderr, flush=True)
            self.next_pct = (pct // 10 + 1) * 10


class _Rich:
    def __init__(self, prog: Progress, task):
        self.prog, self.task = prog, task

    def advance(self, n: int = 1, info: str = ""):
        self.prog.update(self.task, advance=n, info=info)


@contextlib.contextmanager
def progress(total: int, desc: str, quiet: bool = False):
    """`with progress(n, "training") as p: p.advance(1, info="loss 0.3")`."""
    if quiet or not _err.is_terminal:
        yield _Plain(total, desc, quiet)
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=_err, transient=False) as prog:
        yield _Rich(prog, prog.add_task(desc, total=total, info=""))
