"""What every command area shares: the one typer app with its global ``--db``, opening that file, JSON
output, bars, progress bars, the console.

The area modules register their commands on :data:`app`; :mod:`.app` imports them all and runs it. Kept
light: rich and numpy are imported only when a command actually draws or serialises.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Iterator

import typer

from ..errors import MoedbError
from ..types import json_default

app = typer.Typer(help="moedb: an embedded mixture-of-experts retrieval engine in one SQLite file.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _global(ctx: typer.Context,
            db: str = typer.Option("./moedb.db", "--db", envvar="MOEDB_DB", help="Database file.")) -> None:
    ctx.obj = {"db": db}


JSON_OPT = typer.Option(False, "--json", help="Machine-readable JSON output.")
REFIT_OPT = typer.Option(True, "--refit/--no-refit",
                         help="Fit the router now, so the next `moedb route` does not pay for it.")


def existing_db(path: str) -> str:
    """``path`` (the ``--db``) when it names a database; else the error every command gives."""
    if path != ":memory:" and not os.path.exists(path):
        raise MoedbError(f"no database at {path!r} (run `moedb init` or pass --db)")
    return path


@contextlib.contextmanager
def open_db(ctx: typer.Context, must_exist: bool = True) -> Iterator[Any]:
    """Open the database named by ``--db``; a missing file is an error except for ``init``. A command that
    created the file and then failed (say ``add-expert`` on an empty folder) leaves no file behind."""
    path = ctx.obj["db"]
    existed = path == ":memory:" or os.path.exists(path)
    if must_exist:
        existing_db(path)
    import moedb

    db = moedb.connect(path)
    try:
        yield db
    except BaseException:
        db.close()
        if not existed:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(path + suffix)
        raise
    db.close()


def warm_router(db, refit: bool) -> None:
    """With ``--refit``: after a change of experts, do now what the next route would do (under a spinner)."""
    if refit and not sys.stderr.isatty():
        db.warm_router()  # (no spinner on a pipe or file)
    elif refit:
        from rich.console import Console

        with Console(stderr=True).status("fitting the router"):
            db.warm_router()


@contextlib.contextmanager
def skipped_files() -> Iterator[list[dict[str, str]]]:
    """Print each file the command skipped (a :class:`moedb.errors.SkippedFile` warning) as one ``skipped:``
    line on stderr; the list it yields then holds them as ``{"file", "reason"}`` (for ``--json``)."""
    import warnings

    from ..errors import SkippedFile

    out: list[dict[str, str]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedFile)
        try:
            yield out
        finally:
            others = []
            for w in caught:
                if issubclass(w.category, SkippedFile):
                    out.append({"file": w.message.path, "reason": w.message.reason})
                    typer.echo(f"skipped: {w.message}", err=True)
                else:
                    others.append(w)
    for w in others:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def console():
    from rich.console import Console

    return Console()


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2, default=json_default) + "\n")


def bar(value: float, width: int = 20) -> str:
    value = min(max(value, 0.0), 1.0)
    full = int(round(value * width))
    return "█" * full + "░" * (width - full)


class progress_bar:
    """A rich progress bar usable as the library's ``progress(done, total)`` callback (stderr)."""

    def __init__(self, label: str):
        self.label = label
        self._p = None
        self._task = None

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._p = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self._p.__enter__()
        self._task = self._p.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        self._p.update(self._task, completed=done, total=total)

    def __exit__(self, *exc):
        self._p.__exit__(*exc)


class LazyBar:
    """A progress bar that appears on the first progress report (so an early error prints alone)."""

    def __init__(self, label: str):
        self.label = label
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if not sys.stderr.isatty():
                return  # (a bar on a pipe or file is only a stray empty line when it closes)
            self.bar = progress_bar(self.label).__enter__()
        self.bar(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


class StageBar:
    """``progress(stage, done, total)``: one transient bar per stage (for tune-embedder)."""

    def __init__(self):
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = progress_bar(stage).__enter__()
        self.bar(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
