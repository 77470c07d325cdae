"""The `moedb` command: a thin translation of library calls, one module per area.

``app`` (the typer app, ``--db``, :func:`main` and its error handling), ``common`` (opening the file,
JSON, bars), and the command areas ``experts``, ``routing``, ``lifecycle``, ``stats``, ``generation``.
Importing this package registers every command on :data:`app`.
"""
from .app import app, load_commands, main

load_commands()

__all__ = ["app", "main"]
