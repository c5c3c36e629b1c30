"""Plain torch models (no Lightning): encoders, heads, adapters, SIMONet."""
