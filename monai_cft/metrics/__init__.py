"""monai-cft metrics."""
