"""Exceptions raised by moedb.

Every error a user can cause derives from :class:`MoedbError`; the CLI turns any of
them into a one-line message and exit code 1.
"""


class MoedbError(Exception):
    """Base class of all moedb errors that a user can cause and fix."""


class SchemaError(MoedbError):
    """The file's schema is newer than this moedb, or an applied migration was edited."""


class UnknownExpert(MoedbError, KeyError):
    """An expert name that does not exist in the file."""

    def __init__(self, name: str, role: str = "expert"):
        super().__init__(name)
        self.name = name
        self.role = role

    def __str__(self) -> str:
        return f"unknown {self.role}: {self.name!r}" + (
            " (it does not exist in this database)" if self.role != "expert" else "")


class DuplicateExpert(MoedbError):
    """An expert with that name already exists."""


class DuplicateDocument(MoedbError):
    """A document id already exists in the expert."""


class InvalidInput(MoedbError, ValueError):
    """Bad argument: empty text, bad metadata, top_k < 1, ..."""


class DimensionMismatch(InvalidInput):
    """A vector's dimension differs from the file's embedding dimension."""


class InvalidVector(InvalidInput):
    """A vector with NaN or infinite values, or the wrong shape."""


class EmbedderMismatch(MoedbError):
    """The file was built with a different embedding model."""


class FileProblem(MoedbError):
    """A file or directory that cannot be read or parsed."""


class DatabaseBusy(MoedbError):
    """Another connection held the file's write lock for longer than the busy timeout."""


class ConcurrentChange(MoedbError):
    """Another process changed what a long operation was computed from (nothing of it was written)."""


class ConfigError(MoedbError, ValueError):
    """Invalid configuration (generator, strategy, settings); names the field."""


class SkippedFile(UserWarning):
    """A file found in a folder that was not read (a link leading outside it, a FIFO or device, an empty
    or binary file); the message names it and why. The CLI prints one line per skipped file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
