"""Adapters: the local sandbox provider and the Postgres ledger and registry."""
