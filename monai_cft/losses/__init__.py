"""monai-cft losses."""
