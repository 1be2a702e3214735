"""Code the tests share, and no tests: one module per concept, named for what it provides.

The proxy started on loopback and spoken to (`running_proxy`), on the test keys and
policies (`keys`, `policies`); stand-ins for what surrounds it (`echo_backend`,
`example_backend`, `resetting_backend`, `idp_server`, `redis_server`, `certs`); clients
for each of its doors (`chat`, `ext_authz`, `ext_authz_h2`, `ext_authz_http`, `h2client`,
`h2_streams`, `admin`, `cli`, `client`, `operations`); tokens, honest and hand-built
(`tokens`, `jws`, `attacks`); the README and the Dockerfile as the tests read them
(`readme`, `dockerfile`); and bounded waits (`waits`). Fixtures are registered in
`tests/conftest.py`: a test module imports names from here, never a fixture."""
