"""The `moedb` command: a thin translation of library calls, one module per area.

``app`` (the entry point :func:`main` and its error handling), ``common`` (the typer app and its global
``--db``, opening that file, JSON, bars), and the command areas ``experts``, ``routing``, ``lifecycle``,
``stats``, ``generation``. Importing this package registers every command on :data:`app`.
"""
from .app import app, main

__all__ = ["app", "main"]
