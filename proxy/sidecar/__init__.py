"""The gRPC sidecar front end: `listener` assembles it; `relay` takes each client
connection and `call` relays one call frame by frame to a stream on a pooled backend
connection (`upstream_pool`); `stream_guard` ends open streams when their token expires or
is revoked, or the policy changes; `peer_identity` reads a client certificate's identity;
`catalog` knows which methods stream (reflection, descriptor sets)."""
