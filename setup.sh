#!/usr/bin/env bash
# One-command set-up: a virtual environment with pinned packages, then the data, tokenizers, checkpoints and
# reference outputs, copied from a local mirror when one is named, else downloaded from their public sources.
#
#   ./setup.sh [--mirror DIR] [--test] [--no-stories42M]
#
#   --mirror DIR      a folder laid out like ../shared/assets (also: MINLLAMA_ASSETS=DIR)
#   --test            also install the test and benchmark extras (pytest, transformers, peft, matplotlib, torchao)
#   --no-stories42M   skip the 167 MB default model (offline machines, CI)
#
# Idempotent: files already in place and valid are kept. Any failed step stops with the file and the reason.
set -euo pipefail
cd "$(dirname "$0")"

mirror="${MINLLAMA_ASSETS:-}"
extras=0
want_42m=1
while [ $# -gt 0 ]; do
  case "$1" in
    --mirror) mirror="${2:?--mirror needs a folder}"; shift 2 ;;
    --test) extras=1; shift ;;
    --no-stories42M) want_42m=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see ./setup.sh --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$mirror" ] && [ ! -d "$mirror" ]; then
  echo "setup.sh: mirror folder $mirror does not exist" >&2; exit 2
fi

fail() { echo "setup.sh: $*" >&2; exit 1; }

# --- Python environment -------------------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || fail "could not create .venv (is python3-venv installed?)"
fi
requirements=requirements.txt
[ "$extras" = 1 ] && requirements=requirements-test.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements" \
  || fail "pip could not install $requirements"

# --- Assets ---------------------------------------------------------------------------------------------------
ASSIGNMENT=https://raw.githubusercontent.com/neubig/minllama-assignment/main
TINYLLAMAS=https://huggingface.co/karpathy/tinyllamas/resolve/main

# fetch DEST MIRROR_PATH URL...: copy from the mirror if it has the file, else try each URL in turn.
fetch() {
  local dest=$1 rel=$2; shift 2
  [ -s "$dest" ] && return 0
  mkdir -p "$(dirname "$dest")"
  if [ -n "$mirror" ] && [ -s "$mirror/$rel" ]; then
    cp "$mirror/$rel" "$dest.part" && mv "$dest.part" "$dest" && return 0
  fi
  local url
  for url in "$@"; do
    echo "downloading $dest from $url"
    if curl -fsSL --retry 2 -o "$dest.part" "$url"; then
      mv "$dest.part" "$dest"
      return 0
    fi
  done
  rm -f "$dest.part"
  local fix="pass --mirror DIR"
  [ -n "$mirror" ] && fix="put it in $mirror/$rel"
  [ "$dest" = stories42M.pt ] && fix="add --no-stories42M to go on without the default model (stories260K stays)"
  fail "could not get $dest: not in the mirror (${mirror:-none given}) and no download succeeded; $fix"
}

for split in train dev test; do
  for dataset in sst cfimdb; do
    fetch "data/$dataset-$split.txt" "data/$dataset-$split.txt" "$ASSIGNMENT/data/$dataset-$split.txt"
  done
done
for dataset in sst cfimdb; do
  fetch "data/$dataset-label-mapping.json" "data/$dataset-label-mapping.json" "$ASSIGNMENT/data/$dataset-label-mapping.json"
done
fetch tokenizer.model tokenizer.model "$ASSIGNMENT/tokenizer.model"
for file in stories260K.pt stories260K.bin tok512.model tok512.bin; do
  fetch "$file" "models/$file" "$TINYLLAMAS/stories260K/$file"
done
for file in sanity_check.data optimizer_test.npy rotary_embedding_actual.data; do
  fetch "$file" "reference/$file" "$ASSIGNMENT/$file"
done
if [ "$want_42m" = 1 ]; then
  fetch stories42M.pt models/stories42M.pt https://www.cs.cmu.edu/~vijayv/stories42M.pt "$TINYLLAMAS/stories42M.pt"
fi

# --- Check what we got ------------------------------------------------------------------------------------------
# Files whose public copy is fixed are checked byte for byte; the checkpoints and tokenizers by loading them.
sha256sum --quiet -c - <<'SUMS' || fail "a file above differs from its public source: delete it and run ./setup.sh again"
9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347  tokenizer.model
7aeac81f2a387f2ce7fab98ed8f40ef85cc9c8ad11bcbb63b122e95665cb1f35  data/sst-train.txt
11963c76cd073e68006da0390620aadf5a4b8f775e2f900e92a50b3002e39b9b  data/sst-dev.txt
bdcc8352d37bdc82113e4a4dd887b824144201539d5a1e49be566232d306a4ba  data/sst-test.txt
278e200499d1d68a1a9d80e3947a2203cc97130632d8a53f2b9c11de9cb6c699  data/cfimdb-train.txt
b38f0c095c4624e85927116728140e96d0221969b34146f65eae5b5bb24752b8  data/cfimdb-dev.txt
8ad2f6da7bfb0e8fc36cf89eda47c574cc9c35d6347e665f31bc904d9ecfe0a7  data/cfimdb-test.txt
831e6914e25d9b9eb56ff9095b3f035bdaf1b9568d385a70ef481c82af0382b3  data/sst-label-mapping.json
afeac43f5a5fe8758469078418519df4c8503c2e30e2fcf6c61464fce3d44a36  data/cfimdb-label-mapping.json
SUMS
checkpoints="stories260K.pt:tok512.model stories260K.bin:tok512.model"
[ "$want_42m" = 1 ] && checkpoints="$checkpoints stories42M.pt:tokenizer.model"
for pair in $checkpoints; do
  .venv/bin/python - "${pair%%:*}" "${pair##*:}" <<'PY' || fail "${pair%%:*} or ${pair##*:} does not load: delete it and run ./setup.sh again"
import sys
from llama import load_pretrained
from tokenizer import Tokenizer
from utils import UsageError
try:
    model = load_pretrained(sys.argv[1])
    Tokenizer(tokenizer_model=sys.argv[2]).check_vocab(model.config.vocab_size, sys.argv[1])
except UsageError as e:
    sys.exit(f"setup.sh: {e}")
PY
done
echo "setup.sh: ready (data in data/, checkpoints and tokenizers checked: $checkpoints)"
