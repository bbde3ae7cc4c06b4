"""Retrieval evaluation: embedding, exact search, metrics, evaluation sets."""
