"""The Envoy ext_authz front ends: `answer` translates a `Decision` into Envoy's
CheckResponse; `grpc_check` serves the v3 Check over gRPC; `http_check` serves the HTTP
mode (`http_protocol` parses, `http_request` reads the request, `http_reply` writes)."""
