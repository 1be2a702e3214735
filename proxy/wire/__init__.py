"""HTTP/2 and gRPC on the wire, shared by the front ends: the HTTP/2 engine on libnghttp2
(`h2_engine`, the only module that imports `ngh2`) and its server side (`h2_server`),
gRPC framing and status headers (`grpc_protocol`, `grpc_status`), and a small gRPC server
for the proxy's own services (`grpc_server`, `health_service`), and binding every
listener of the proxy (`listen`)."""
