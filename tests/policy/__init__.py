"""Tests of the policy: loading, errors, HTTP routes, lint (`proxy/policy/`)."""
