"""Tests of shared state: memory, Redis, the state file (`proxy/state/`)."""
