"""Data: the shard format and reader, raw readers, the dataset registry, tokenization, sampling and batches."""
