"""Over-the-air model updates: an explicit state table, atomic persistence, model slots."""
