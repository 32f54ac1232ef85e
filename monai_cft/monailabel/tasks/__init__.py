"""The monai-cft MONAI Label tasks (each needs MONAI Label installed)."""
