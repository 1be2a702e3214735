"""Tests of assembling and operating the proxy: operations, admin, workers, TLS (`proxy/runtime/`)."""
