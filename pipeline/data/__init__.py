"""Shard writing, shard streaming and transforms."""
