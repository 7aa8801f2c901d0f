#!/usr/bin/env bash
# Records issue 24's tables (benchmarks/tables/v2/), one budget level after another, at the lowest CPU priority so
# other work can go on beside it; run it again to continue: a level already finished is skipped, one started is
# resumed (`search --resume`), so it can go on over several sittings. Then export each dataset's levels with
# `melora-tune table` (the commands are in benchmarks/README.md, "Issue 24's tables").
#
#   bash benchmarks/record_tables.sh [RECORD_DIR]     # default /work/record2: mlflow.db, runs/, log.txt
#
# About 62 min per TREC level (126 trials; the 108-trial levels less) and about 2 hours for rotten_tomatoes (1.1 trials a
# minute alone) on the 2-core CPU machine, two trials at once.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/work/record2}
mkdir -p "$DIR/runs"
export HF_HUB_OFFLINE=1
for s in table_trec_b18k table_rt_b18k table_trec_b9k table_trec_b37k; do
  [ -f "$DIR/$s.done" ] && continue
  flag=()
  ls -d "$DIR/runs/$s"-* >/dev/null 2>&1 && flag=(--resume)
  echo "=== $s ${flag[*]} $(date)"
  # Its own session, whose autogroup is set to nice 19 as well: Linux's autogroup scheduler shares the CPU between
  # sessions first, so a process's nice alone only ranks it inside its session (measured: the niced recording still
  # took 86 % of the CPU beside a test run, until its autogroup was niced).
  setsid --wait bash -c 'echo 19 > /proc/self/autogroup 2>/dev/null; exec nice -n 19 "$@"' _ \
    .venv/bin/melora-tune search "search_spaces/$s.yaml" "${flag[@]}" \
    --tracking-uri "sqlite:///$DIR/mlflow.db" --storage-path "$DIR/runs"
  rc=$?
  [ "$rc" = 0 ] && touch "$DIR/$s.done"
  echo "=== $s rc=$rc $(date)"
done
