#!/usr/bin/env bash
# Zero-shot in-context accuracy on the paper's tasks (scoring only, no generation).
#   CKPT=checkpoints/train_gpu64/checkpoint_best.pt ZEROSHOT_DIR=/path/to/task/files bash recipes/eval_zeroshot.sh
# Optional: TASKS (copa,piqa,storycloze,winogrande,hellaswag,record), SPM_MODEL (sentencepiece model of
# the data), OUTPUT (results json), CPU=1, EXTRA_ARGS (options with quotes: after the script name). Expert-parallel rank files are resharded first.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
CKPT=$(single_worker_checkpoint "${CKPT:-}") || exit 1  # a failed reshard stops here: no stale file evaluated
require_path CKPT "$CKPT"
require_path ZEROSHOT_DIR "${ZEROSHOT_DIR:-}"
extra_args
cmd=(fairseq-smlp-zeroshot --path "$CKPT" --data-dir "$ZEROSHOT_DIR"
     --tasks "${TASKS:-copa,piqa,storycloze,winogrande,hellaswag,record}" --output "${OUTPUT:-${CKPT%.pt}-zeroshot.json}"
     ${SPM_MODEL:+--spm-model "$SPM_MODEL"} ${CPU:+--cpu} "${EXTRA[@]}" "$@")
echo "+ ${cmd[*]}"
"${cmd[@]}"
