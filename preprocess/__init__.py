"""Offline jobs that turn raw query/passage/negative datasets into memory-mapped token shards."""
