"""SQL of the generation area; mixed into :class:`moedb.db.Store` (all SQL stays in the store)."""
from __future__ import annotations


class GenerationSQL:
    """Store methods for generation."""
