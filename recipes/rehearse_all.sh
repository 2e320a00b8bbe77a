#!/usr/bin/env bash
# Rehearse every training recipe on this CPU (REHEARSE=1, see _common.sh and fairseq_smlp/rehearse.py)
# at W = 2 and 4 gloo workers, and write the table to recipes/rehearsal.md (row by row, as each
# rehearsal ends). Long: about an hour on 2 cores; run it with nohup.
#   bash recipes/rehearse_all.sh                    # every recipe, W = 2 4
#   RECIPES="train_gpu32_smlp.sh train_gpu32_base.sh" WORKERS="2" bash recipes/rehearse_all.sh
# Optional: REHEARSE_PRECISION (fp16: the recipes' own --fp16), ROOT [rehearse/all], TABLE [recipes/rehearsal.md].
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
ROOT=${ROOT:-rehearse/all}
TABLE=${TABLE:-$HERE/rehearsal.md}
RECIPES=${RECIPES:-$(cd "$HERE" && ls train_gpu*.sh)}
WORKERS=${WORKERS:-2 4}
mkdir -p "$ROOT"
RESULTS="$(cd "$ROOT" && pwd)/results.jsonl"
: > "$RESULTS"
failed=0
write_table() {  # the whole table into a temporary file beside TABLE, then renamed onto it
  local tmp
  tmp=$(mktemp "$TABLE.tmp-XXXXXX")
  if ! {
    echo "# Recipe rehearsals on the CPU"
    echo
    echo "\`bash recipes/rehearse_all.sh\` ($(date -u +%Y-%m-%d), $(nproc) CPU cores, precision ${REHEARSE_PRECISION:-fp16}):"
    echo "each training recipe's own fairseq-train command at reduced width (fairseq_smlp/rehearse.py SIZES), W gloo"
    echo "workers, 16 updates; killed with SIGKILL once update 8's checkpoint exists, restarted with the same command"
    echo "(resumed identical: every per-update loss after the restart and the final weights equal the uninterrupted"
    echo "run's); recipes/eval_ppl.sh on the validation set (rank files resharded to one worker) against the run's last"
    echo "validation perplexity; recipes/eval_zeroshot.sh on five COPA examples."
    echo
    python -m fairseq_smlp.rehearse --table "$RESULTS"
  } > "$tmp"; then
    rm -f "$tmp"
    echo "    table not written (see above)"
    return 1
  fi
  chmod 644 "$tmp" && sync "$tmp" && mv -f "$tmp" "$TABLE"
}
for recipe in $RECIPES; do
  for w in $WORKERS; do
    name=${recipe%.sh}
    echo "=== $name W=$w"
    if ! REHEARSE=1 REHEARSE_WORKERS=$w REHEARSE_DIR="$ROOT/$name-w$w" REHEARSE_RESULTS="$RESULTS" REHEARSE_DATA="$ROOT/ptb" \
        bash "$HERE/$recipe" > "$ROOT/$name-w$w.log" 2>&1; then
      failed=$((failed + 1))
      echo "    FAILED (see $ROOT/$name-w$w.log)"
    fi
    (cd "$REPO" && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" write_table)
  done
done
echo "table: $TABLE ($failed failed)"
exit $(( failed > 0 ))
