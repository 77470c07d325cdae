"""moedb: an embedded mixture-of-experts retrieval engine in one SQLite file.

>>> import moedb
>>> db = moedb.connect(":memory:")                                   # doctest: +SKIP
>>> db.add_expert("security", ["JWT tokens expire after ..."])       # doctest: +SKIP
>>> db.route("How do I fix a JWT auth bug?").experts                 # doctest: +SKIP
"""
from .ask.service import Answer
from .database import Database, connect
from .embed import CallableEmbedder, SentenceTransformerEmbedder, VectorsOnly
from .errors import (ConfigError, DimensionMismatch, DuplicateDocument, DuplicateExpert, EmbedderMismatch,
                     FileProblem, InvalidInput, InvalidVector, MoedbError, SchemaError, UnknownExpert)
from .types import Expert, ExpertScore, Hit, RouteResult

__version__ = "0.1.0"

__all__ = [
    "connect", "Database", "Answer", "Expert", "ExpertScore", "Hit", "RouteResult",
    "SentenceTransformerEmbedder", "CallableEmbedder", "VectorsOnly",
    "MoedbError", "SchemaError", "UnknownExpert", "DuplicateExpert", "DuplicateDocument", "InvalidInput",
    "DimensionMismatch", "InvalidVector", "EmbedderMismatch", "FileProblem", "ConfigError", "__version__",
]
