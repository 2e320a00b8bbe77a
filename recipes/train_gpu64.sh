#!/usr/bin/env bash
# The paper's scaled sMLP: deterministic routing, about 9.4B parameters, 64 GPUs with one tMoE expert each, 1M tokens per update, 100k updates (105B tokens).
# Usage: DATA=/path/to/data-bin bash recipes/train_gpu64.sh      (DRY_RUN=1 to check without data/GPUs)
export RUN=${RUN:-train_gpu64} ARCH=${ARCH:-smlp_lm_9b} GPUS=${GPUS:-64} EXPERTS_PER_GPU=${EXPERTS_PER_GPU:-1}
export LR=${LR:-2e-4} MAX_UPDATE=${MAX_UPDATE:-100000}
export EXTRA_ARGS="${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/train_lm.sh" "$@"
