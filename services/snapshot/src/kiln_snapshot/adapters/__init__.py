"""Real implementations of the snapshot's ports."""
