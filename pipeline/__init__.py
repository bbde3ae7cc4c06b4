"""Training library for LLM-based text embedding models: shards, model, losses, GradCache, trainer, export."""
