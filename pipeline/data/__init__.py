"""The data path: shards and their index, where they come from, the training and evaluation streams, transforms
and GPU decode."""
