"""The parts of an open file that every call goes through: its embedder, the catalog of experts, the expert
editor, the gate service (the one place that fits the router), routing, retrieval and balancing state."""
