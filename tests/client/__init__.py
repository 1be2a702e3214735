"""Tests of the Python client library (`proxy/client/`)."""
