"""Tests of the decision pipeline and the headers it rewrites (`proxy/decide/`)."""
