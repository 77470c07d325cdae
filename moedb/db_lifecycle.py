"""SQL of the lifecycle area; mixed into :class:`moedb.db.Store` (all SQL stays in the store)."""
from __future__ import annotations


class LifecycleSQL:
    """Store methods for lifecycle."""
