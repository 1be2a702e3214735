"""The decision pipeline, the one path every front end calls: match the method's rule →
extract the bearer token (`bearer`) → verify it for the rule's level → check shared state
(`state_checks`) → check requirements and rate limits (`rate_limits`) → a `Decision`
(`decision`, with its `reasons`). `pipeline.Authorizer` runs the steps; `identity` is what
a verified token says; `auth_headers` rewrites a call's metadata for the backend (strip
what the client may not send, inject the verified identity)."""
