"""monai-cft utils."""
