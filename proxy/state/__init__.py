"""Shared state: revocations and single-use records. `store` is the in-memory store and
the interface the pipeline uses; `redis_store` shares it between replicas; `file` keeps
in-memory state across restarts."""
