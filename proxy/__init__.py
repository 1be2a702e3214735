"""authproxy: a gRPC auth sidecar driven by a YAML method policy."""

__version__ = "0.1.0"
