"""Retrieval: the in-memory embedding index and exact top-k."""
