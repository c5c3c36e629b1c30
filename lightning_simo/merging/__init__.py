"""Task-vector merging: pure functions on state dicts."""
