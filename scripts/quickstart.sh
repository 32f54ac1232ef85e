#!/usr/bin/env bash
# The main job of monai-cft on a fresh machine: creates the virtual environment, installs the
# package (CPU torch 2.13.0 first, so pip never pulls a CUDA build), then runs every stage of
# `python -m monai_cft.pipeline` on the embedded synthetic coronary dataset. Extra arguments go
# to the pipeline, e.g. `bash scripts/quickstart.sh --stages generate prepare` or `--force all`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
exec .venv/bin/python -m monai_cft.pipeline "$@"
