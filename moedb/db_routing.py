"""SQL of the routing area; mixed into :class:`moedb.db.Store` (all SQL stays in the store)."""
from __future__ import annotations


class RoutingSQL:
    """Store methods for routing."""
