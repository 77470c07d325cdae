"""The ``moedb`` typer app: the global ``--db`` option, the entry point and its error handling.

The commands live in one module per area (:mod:`.experts`, :mod:`.routing`, :mod:`.lifecycle`,
:mod:`.stats`, :mod:`.generation`); each registers on :data:`app` when imported, and :func:`main`
imports them all. Library errors become a one-line ``error: ...`` on stderr and exit code 1;
typer's usage errors print its usual usage message and exit 2.
"""
from __future__ import annotations

import sys
from typing import Optional

import typer

from ..errors import MoedbError

app = typer.Typer(help="moedb: an embedded mixture-of-experts retrieval engine in one SQLite file.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _global(ctx: typer.Context,
            db: str = typer.Option("./moedb.db", "--db", envvar="MOEDB_DB", help="Database file.")) -> None:
    ctx.obj = {"db": db}


def load_commands() -> None:
    """Register every command area on :data:`app` (idempotent: a module registers once, on import)."""
    # in this order: it is the order of `moedb --help`
    from . import experts  # noqa: F401
    from . import routing  # noqa: F401
    from . import lifecycle  # noqa: F401
    from . import stats  # noqa: F401
    from . import generation  # noqa: F401


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    load_commands()
    try:
        # Standalone mode: typer itself handles the usage errors it raises (missing argument, bad value,
        # unknown command or option) with whichever click it uses (its vendored ``typer._click`` since
        # 0.2x, click before): usage message on stderr, exit 2, no traceback. It also turns Ctrl-C into
        # exit 130 and always ends in sys.exit. Only our own errors come out of it.
        app(args=argv, prog_name="moedb", standalone_mode=True)
    except MoedbError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    sys.exit(0)  # pragma: no cover - typer exits itself in standalone mode


if __name__ == "__main__":  # pragma: no cover
    main()
