"""Real adapters (Postgres, Anthropic) and an in-memory checkpoint store for tests and tools."""
