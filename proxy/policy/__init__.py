"""The policy: which level (and which roles, permissions, scopes, peers) each gRPC method
and HTTP route needs. `model` is what a loaded policy is; `loader` reads and checks a YAML
file (every problem as `file:line: problem`, never half-applied) with `yaml_source`,
`values`, `limits` and `strip_section`; `http_routes` matches ext_authz HTTP requests;
`memo` remembers lookups per policy snapshot; `lint` compares a policy with the methods a
backend serves."""
