"""Tests of keys and token verification (`proxy/keys/`)."""
