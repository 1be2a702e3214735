"""Tests of the authproxy command (`proxy/cli/`)."""
