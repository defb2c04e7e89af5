"""The small wiring library every service shares: bus, settings, logging, Postgres, retries."""
