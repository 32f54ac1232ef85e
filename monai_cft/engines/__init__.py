"""monai-cft engines."""
