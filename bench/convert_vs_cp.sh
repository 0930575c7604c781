#!/bin/sh
# tensorbridge convert beside cp and cp+sync, alternating, after sync; prints medians.
#   sh bench/convert_vs_cp.sh SRC.pt [ROUNDS]
# SRC is e.g. the checkpoint bench/run.py --only file_convert leaves in /tmp/tensorbridge-bench/.
set -eu
SRC=$1; ROUNDS=${2:-7}
TB=${TB:-$(dirname "$0")/../.venv/bin/tensorbridge}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cat "$SRC" > /dev/null  # the source in the page cache for everyone alike
i=0
while [ "$i" -lt "$ROUNDS" ]; do
  for k in cp cp+sync convert convert--no-verify; do
    rm -f "$WORK/out.pt" "$WORK/out.safetensors"; sync
    s=$(date +%s.%N)
    case $k in
      cp) cp "$SRC" "$WORK/out.pt" ;;
      cp+sync) cp "$SRC" "$WORK/out.pt" && sync "$WORK/out.pt" ;;
      convert) "$TB" convert -q "$SRC" "$WORK/out.safetensors" ;;
      convert--no-verify) "$TB" convert -q --no-verify "$SRC" "$WORK/out.safetensors" ;;
    esac
    e=$(date +%s.%N)
    echo "$k $(echo "$e - $s" | bc)"
  done
  i=$((i + 1))
done | python3 -c '
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in sys.stdin:
    k, v = line.split()
    runs[k].append(float(v))
cp, durable = statistics.median(runs["cp"]), statistics.median(runs["cp+sync"])
for k, v in runs.items():
    m = statistics.median(v)
    print(f"{k:20s} median {m:.3f} s  min {min(v):.3f} s  {m / cp:.2f}x cp  {m / durable:.2f}x cp+sync")
'
