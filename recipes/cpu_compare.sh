#!/usr/bin/env bash
# The small-scale comparison on a CPU machine: sMLP (both spatial routings, the tMoE routed like
# Switch: smlp_top1, and without its training capacity: smlp_top1_dropless) and every baseline family at
# the tiny, FLOP-matched size, trained for the same wall-clock each, round-robin in one process;
# writes the table, JSON and plots (benchmarks/compare.py).
# Default: the unrepeated regime of the sparsity study (benchmarks/sparsity) — WikiText-2 + books-mix (one 8k
# sentencepiece BPE), at most one pass (no token seen twice), 16 experts in every MoE layer, bf16
# autocast (fairseq --cpu --bf16), lr 0.008 and dropout 0 for every model, validation on 768 blocks
# spread over WikiText-2 + books-mix valid.
# Usage: bash recipes/cpu_compare.sh   (MINUTES per model [10], POINTS [6], THREADS [1], OUT, MODELS,
#        CORPUS [wikitext-2+books-mix], PRECISION [bf16], EXPERTS [16], MAX_EPOCHS [1], LR [0.008], DROPOUT [0])
# The earlier WikiText-2 run (benchmarks/results/compare.md): CORPUS=wikitext-2 PRECISION=fp32 EXPERTS=0
#   MAX_EPOCHS=0 LR=0.002 DROPOUT=0.1 MINUTES=5 VALID_BLOCKS=1024 VALID_SPREAD=0.
# DRY_RUN=1: every model is built and trained for 3 seconds in 2 round-robin slices, scored on
# 16 validation blocks, output in a temp dir (DATA_BIN: an existing data-bin instead of the corpus),
# in fp32 unless PRECISION is given.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MINUTES=${MINUTES:-10} POINTS=${POINTS:-6} THREADS=${THREADS:-1}
USER_PRECISION=${PRECISION:-}
CORPUS=${CORPUS:-wikitext-2+books-mix} PRECISION=${PRECISION:-bf16} EXPERTS=${EXPERTS:-16} MAX_EPOCHS=${MAX_EPOCHS:-1}
LR=${LR:-0.008} DROPOUT=${DROPOUT:-0} VALID_BLOCKS=${VALID_BLOCKS:-768} VALID_SPREAD=${VALID_SPREAD:-1}
OUT=${OUT:-$REPO/benchmarks/results/compare_unrepeated}
read -r -a MODEL_LIST <<< "${MODELS:-smlp smlp_top1 smlp_top1_dropless smlp_partial gmlp transformer switch gshard base hash}"
if [ "${DRY_RUN:-0}" = 1 ]; then
  MINUTES=0.05 POINTS=2 VALID_BLOCKS=16
  PRECISION=${USER_PRECISION:-fp32}  # bf16's first steps set up its kernels: longer than a dry run's budget
  OUT=$(mktemp -d)/compare
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # python -m benchmarks.NAME from any folder
cmd=(python -m benchmarks.compare --minutes "$MINUTES" --points "$POINTS" --threads "$THREADS"
     --models "${MODEL_LIST[@]}" --corpus "$CORPUS" --precision "$PRECISION" --experts "$EXPERTS"
     --max-epochs "$MAX_EPOCHS" --valid-blocks "$VALID_BLOCKS" --out "$OUT")
[ "$VALID_SPREAD" = 1 ] && cmd+=(--valid-spread)
[ -n "${DATA_BIN:-}" ] && cmd+=(--data-bin "$DATA_BIN")
cmd+=(-- --lr "$LR" --dropout "$DROPOUT")
echo "+ ${cmd[*]}"
"${cmd[@]}"
[ "${DRY_RUN:-0}" = 1 ] && echo "dry run OK: $(ls "$(dirname "$OUT")" | tr '\n' ' ')"
exit 0
