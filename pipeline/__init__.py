"""mixer-pipeline: WebDataset shards -> DeepSpeed-sharded MLP-Mixer training -> MLflow."""

__version__ = "0.1.0"
