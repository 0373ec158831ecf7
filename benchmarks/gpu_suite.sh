#!/usr/bin/env bash
# The GPU suite from a source checkout, raykd not installed: the checkout goes on PYTHONPATH.
#   bash benchmarks/gpu_suite.sh --out benchmarks/results/gpu_suite_h100.json   # on one GPU, <= 8 minutes
#   bash benchmarks/gpu_suite.sh --dry --out /tmp/gpu_suite_dry.json           # CPU check of every arm
# PYTHON picks the interpreter (default python3: the one with torch and transformers).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_suite.py "$@"
