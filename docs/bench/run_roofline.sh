#!/usr/bin/env bash
# Runs `trainer.roofline` on the bench_1b recipe with the given overrides and copies its report to
# $OUT/NAME.{md,json,png}. Usage (device call): bash docs/bench/run_roofline.sh NAME "override ..."
set -u
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
name=$1
echo "== roofline $name: $2"
# shellcheck disable=SC2086
python3 -m trainer.roofline recipe=bench_1b run.dir=/tmp/runs/$name log.progress=lines $2 > "$OUT/$name.log" 2>&1
tail -n 30 "$OUT/$name.log" | cut -c1-300
for ext in md json png; do
  cp "/tmp/runs/$name/roofline/roofline.$ext" "$OUT/$name.$ext" 2>/dev/null
done
