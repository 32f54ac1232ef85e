"""monai-cft networks."""
