"""The ``moedb`` entry point: the command areas on the one typer app, and the error handling.

The app and its global ``--db`` live in :mod:`.common`; each area module registers its commands on it:
:mod:`.experts`, :mod:`.routing`, :mod:`.lifecycle`, :mod:`.stats`, :mod:`.generation` (imported here in
the order of ``moedb --help``). Library errors become a one-line ``error: ...`` on stderr and exit code 1;
typer's usage errors print its usual usage message and exit 2.
"""
from __future__ import annotations

import sys
from typing import Optional

import typer

from ..errors import MoedbError
from . import experts  # noqa: F401  (registers init, add-expert, add-docs, list, show, remove-expert)
from . import routing  # noqa: F401  (route, search)
from . import lifecycle  # noqa: F401  (feedback, ingest-feedback, retrain, split, merge, rename, optimize, ...)
from . import stats  # noqa: F401  (stats)
from . import generation  # noqa: F401  (ask, set-generator, set-strategy, apply)
from . import serve  # noqa: F401  (serve)
from .common import app

__all__ = ["app", "main"]


def _hide_flag_types(command) -> None:
    """``--help`` shows no ``<bool>`` beside flags (typer shows each option's type; a flag takes no value)."""
    for p in command.params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    made = command.get_help_option  # (--help itself is made per call)

    def help_option(ctx, made=made):
        opt = made(ctx)
        if opt is not None and opt.metavar is None:
            opt.metavar = ""
        return opt

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _hide_flag_types(sub)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    try:
        # Standalone mode: typer itself handles the usage errors it raises (missing argument, bad value,
        # unknown command or option) with whichever click it uses (its vendored ``typer._click`` since
        # 0.2x, click before): usage message on stderr, exit 2, no traceback. It also turns Ctrl-C into
        # exit 130 and always ends in sys.exit. Only our own errors come out of it.
        command = typer.main.get_command(app)
        _hide_flag_types(command)
        command(args=argv, prog_name="moedb", standalone_mode=True)
    except MoedbError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    sys.exit(0)  # pragma: no cover - typer exits itself in standalone mode


if __name__ == "__main__":  # pragma: no cover
    main()
