"""Tests of the gRPC sidecar front end: relay, streams, limits (`proxy/sidecar/`)."""
