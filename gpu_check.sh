#!/usr/bin/env bash
# The --use_gpu check: generate (also --quantize int8), prompt, finetune, lora, lora --resume and classify on stories260K, in fp32
# and bf16, on one GPU.
# Run it on a machine with CUDA after ./setup.sh (a few minutes); it stops at the first failure.
#   ./gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-gpu-check}
py=.venv/bin/python
[ -x "$py" ] || { echo "gpu_check.sh: no .venv here; run ./setup.sh first" >&2; exit 2; }
device=$($py -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null) || device=
[ -n "$device" ] || { echo "gpu_check.sh: no CUDA device on this machine (torch.cuda.is_available() is False); run it where there is one" >&2; exit 2; }
echo "$device"
mkdir -p "$out"
model=(--pretrained-model-path stories260K.pt --tokenizer tok512.model --use_gpu)
sst=(--train data/sst-train.txt --dev data/sst-dev.txt --test data/sst-test.txt --label-names data/sst-label-mapping.json)
export TQDM_DISABLE=1
for dtype in fp32 bf16; do
  echo "=== $dtype"
  $py run_llama.py --option generate "${model[@]}" --dtype $dtype \
    --generated_sentence_low_temp_out "$out/gen-$dtype-temp-0.txt" --generated_sentence_high_temp_out "$out/gen-$dtype-temp-1.txt"
  # int8 weights on the GPU take the dequantizing path of decoding.Int8Linear
  $py run_llama.py --option generate "${model[@]}" --dtype $dtype --quantize int8 --temperature 0 \
    --generated_sentence_low_temp_out "$out/gen-int8-$dtype-temp-0.txt"
  $py run_llama.py --option prompt "${model[@]}" "${sst[@]}" --dtype $dtype --batch_size 80 \
    --dev_out "$out/sst-dev-prompting-$dtype.txt" --test_out "$out/sst-test-prompting-$dtype.txt"
  $py run_llama.py --option finetune "${model[@]}" "${sst[@]}" --dtype $dtype --epochs 2 --batch_size 80 --lr 1e-3 \
    --filepath "$out/finetune-$dtype.pt" --dev_out "$out/sst-dev-finetuning-$dtype.txt" --test_out "$out/sst-test-finetuning-$dtype.txt"
  $py run_llama.py --option lora "${model[@]}" "${sst[@]}" --dtype $dtype --epochs 2 --batch_size 80 --lr 2e-3 \
    --filepath "$out/lora-$dtype.pt" --dev_out "$out/sst-dev-lora-$dtype.txt" --test_out "$out/sst-test-lora-$dtype.txt" --overwrite
  # --resume on the GPU: CPU and CUDA random-number states come back from the state file
  $py run_llama.py --option lora "${model[@]}" "${sst[@]}" --dtype $dtype --epochs 3 --batch_size 80 --lr 2e-3 --resume \
    --filepath "$out/lora-$dtype.pt" --dev_out "$out/sst-dev-lora-$dtype.txt" --test_out "$out/sst-test-lora-$dtype.txt"
  # the trained checkpoint labels the dev file again, as the training run did
  $py run_llama.py --option classify --use_gpu --filepath "$out/lora-$dtype.pt" --input data/sst-dev.txt \
    --output "$out/sst-dev-classify-$dtype.txt"
  cmp "$out/sst-dev-classify-$dtype.txt" "$out/sst-dev-lora-$dtype.txt"
done
# greedy decoding in bf16 may drift from fp32 after some tokens; both must still be text that continues the prefix
head -c 300 "$out"/gen-*-temp-0.txt
echo "gpu_check: all runs finished"
