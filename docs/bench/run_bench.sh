#!/usr/bin/env bash
# Runs `trainer.bench` once per argument ("name:override override ..."), one after another, on the
# bench_1b recipe; appends every record to $OUT/bench.jsonl and keeps each log's tail in $OUT/NAME.log.
# BENCH names another entry point with bench's arguments (an A/B script beside this file).
# Usage (device call): bash docs/bench/run_bench.sh "bf16_b8:" "fp8_b16:train.precision=fp8 train.global_batch_size=16 train.micro_batch_size=16"
set -u
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
for spec in "$@"; do
  name=${spec%%:*}
  overrides=${spec#*:}
  echo "== $name: $overrides"
  # shellcheck disable=SC2086
  ${BENCH:-python3 -m trainer.bench} recipe=bench_1b run.dir=/tmp/runs/$name log.progress=lines $overrides \
    > "$OUT/$name.log" 2>&1
  tail -n 4 "$OUT/$name.log" | cut -c1-400
  # Each record tagged with its name and overrides, so the table can be rebuilt from the file alone.
  [ -f /tmp/runs/$name/bench.jsonl ] && python3 -c 'import json, sys
for line in open(sys.argv[1]):
    print(json.dumps({"name": sys.argv[2], "overrides": sys.argv[3], **json.loads(line)}))' \
    /tmp/runs/$name/bench.jsonl "$name" "$overrides" >> "$OUT/bench.jsonl"
done
