"""The policy both benchmarks use: one access-token service, nothing else allowed."""

AUTH_POLICY = """\
version: 1
default: deny
issuer: bench
tokens:
  access: {type: access, audience: api-access}
methods:
  /bench.Svc/*: access
"""
