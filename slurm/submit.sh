#!/usr/bin/env bash
# Submit an experiment as chained Slurm arrays: generate -> evaluate -> merge per run, then tables.
#   slurm/submit.sh --dry-run --shards 8 experiment=paper_main hydra.launcher.partition=gpu
#   slurm/submit.sh --shards 8 experiment=paper_main hydra.launcher.partition=gpu
# Prints every sbatch command first; --dry-run stops there. Without sbatch on PATH it stops before writing anything.
# See slurm/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m stas.slurm "$@"
