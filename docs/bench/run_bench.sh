#!/usr/bin/env bash
# Runs `trainer.bench` once per argument ("name:override override ..."), one after another, on the
# bench_1b recipe; appends every record to $OUT/bench.jsonl and keeps each log's tail in $OUT/NAME.log.
# Usage (device call): bash docs/bench/run_bench.sh "bf16_b8:" "fp8_b16:train.precision=fp8 train.global_batch_size=16 train.micro_batch_size=16"
set -u
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
for spec in "$@"; do
  name=${spec%%:*}
  overrides=${spec#*:}
  echo "== $name: $overrides"
  # shellcheck disable=SC2086
  python3 -m trainer.bench recipe=bench_1b run.dir=/tmp/runs/$name log.progress=lines $overrides \
    > "$OUT/$name.log" 2>&1
  tail -n 4 "$OUT/$name.log" | cut -c1-400
  cat /tmp/runs/$name/bench.jsonl >> "$OUT/bench.jsonl" 2>/dev/null
done
