#!/usr/bin/env bash
# The small-scale comparison on a CPU machine: sMLP (both routings) and every baseline family at
# the tiny, FLOP-matched size, trained for the same wall-clock each on WikiText-2 (8k sentencepiece
# BPE), round-robin in one process; writes the table, JSON and plots (benchmarks/compare.py).
# Usage: bash recipes/cpu_compare.sh      (MINUTES per model [5], POINTS [6], THREADS [1], OUT, MODELS)
# DRY_RUN=1: every model is built and trained for about a second in 2 round-robin slices, scored on
# 16 validation blocks, output in a temp dir (DATA_BIN: an existing data-bin instead of WikiText-2).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MINUTES=${MINUTES:-5} POINTS=${POINTS:-6} THREADS=${THREADS:-1}
OUT=${OUT:-$REPO/benchmarks/results/compare}
read -r -a MODEL_LIST <<< "${MODELS:-smlp smlp_partial gmlp transformer switch gshard base hash}"
if [ "${DRY_RUN:-0}" = 1 ]; then
  MINUTES=0.02 POINTS=2
  OUT=$(mktemp -d)/compare
  EXTRA=(--valid-blocks 16)
else
  EXTRA=()
fi
cmd=(python "$REPO/benchmarks/compare.py" --minutes "$MINUTES" --points "$POINTS" --threads "$THREADS"
     --models "${MODEL_LIST[@]}" --out "$OUT" "${EXTRA[@]}")
[ -n "${DATA_BIN:-}" ] && cmd+=(--data-bin "$DATA_BIN")
echo "+ ${cmd[*]}"
"${cmd[@]}"
[ "${DRY_RUN:-0}" = 1 ] && echo "dry run OK: $(ls "$(dirname "$OUT")" | tr '\n' ' ')"
exit 0
