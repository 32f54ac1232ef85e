"""The sections of ``scripts/benchmark.py`` (one module each) and their shared ``harness``."""
