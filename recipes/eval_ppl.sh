#!/usr/bin/env bash
# Perplexity of a checkpoint with fairseq-eval-lm, on one process.
# An expert-parallel checkpoint (rank files) is first resharded to one worker.
#   CKPT=checkpoints/train_gpu64/checkpoint_best.pt DATA=/path/data-bin bash recipes/eval_ppl.sh
# Optional: SUBSET (test), TOKENS_PER_SAMPLE (1024, the training length), CPU=1, EXTRA_ARGS (options with quotes: after the script name)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_path DATA "${DATA:-}"
CKPT=$(single_worker_checkpoint "${CKPT:-}") || exit 1  # a failed reshard stops here: no stale file evaluated
require_path CKPT "$CKPT"
extra_args
cmd=(fairseq-eval-lm "$DATA" --user-dir "$USER_DIR" --task smlp_language_modeling --path "$CKPT"
     --gen-subset "${SUBSET:-test}" --tokens-per-sample "${TOKENS_PER_SAMPLE:-1024}" --max-tokens 16384
     ${CPU:+--cpu} "${EXTRA[@]}" "$@")
echo "+ ${cmd[*]}"
"${cmd[@]}"
