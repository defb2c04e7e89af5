"""Real implementations of the budget's ports."""
