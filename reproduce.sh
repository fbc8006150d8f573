#!/usr/bin/env bash
# Rerun the commands behind results/ (the lines of commands.txt that write there), from the repo root.
#
#   ./reproduce.sh           every such line, in order: results/ is regenerated (hours on 2 cores: bench/parity.py)
#   ./reproduce.sh --check   the cheap lines (generate and prompt on stories260K) into a scratch folder, then a
#                            byte-for-byte comparison of what they write with the committed files (a few minutes)
#
# Logs hold wall times and are not compared; every other file is.
set -euo pipefail
cd "$(dirname "$0")"
check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "reproduce.sh: unknown option $1 (see ./reproduce.sh --help)" >&2; exit 2 ;;
esac

mapfile -t lines < <(grep -v '^#' commands.txt | grep 'results/')
if [ "$check" = 0 ]; then
  for line in "${lines[@]}"; do
    echo "+ $line" >&2
    bash -c "$line"
  done
  exit 0
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/results"
differ=0
for line in "${lines[@]}"; do
  case "$line" in *"--option generate"*|*"--option prompt"*) ;; *) continue ;; esac
  echo "+ $line" >&2
  bash -c "${line//results\//$scratch/results/}" > /dev/null
done
for made in "$scratch"/results/*; do
  name=$(basename "$made")
  case "$name" in *.log) continue ;; esac
  if cmp -s "$made" "results/$name"; then
    echo "same:    results/$name"
  else
    echo "DIFFERS: results/$name"
    differ=1
  fi
done
exit "$differ"
