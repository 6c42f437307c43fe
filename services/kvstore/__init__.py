"""The global KV cache store: host-memory block pool, disk tier, metadata and data plane."""
