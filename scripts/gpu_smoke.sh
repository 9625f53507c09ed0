#!/usr/bin/env bash
# A short end-to-end check on a GPU machine (see "The device" in the project's
# guide): the binary built here, the machine's own libtorch. Trains the tiny
# model in bf16 on CUDA with LoRA, evaluation, checkpoints and the prediction
# callback, generates with the adapter, then runs a few GLM-4-9B-shape steps
# with gradient checkpointing.
set -euo pipefail
PY=${PY:-/opt/torch/.venv/bin/python3}
export LD_LIBRARY_PATH="$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
B=target/release/glm4
OUT_DIR=${OUT:-/tmp}/gpu_smoke
rm -rf "$OUT_DIR"
$B env
$B sft --model_name_or_path weights/tiny-glm --data_files data/demo_alpaca.json --output_dir "$OUT_DIR/sft" \
  --dtype bfloat16 --bf16 true --max_steps 20 --save_steps 10 --eval_strategy steps --eval_steps 10 \
  --predict_max_new_tokens 16 --disable_tqdm true --report_to jsonl
$B generate --model_name_or_path weights/tiny-glm --adapter_path "$OUT_DIR/sft" --prompt "你好" --max_new_tokens 8 --json
$B bench --model_config glm-4-9b --random_init --dtype bfloat16 --device cuda --batch_size 2 --seq_len 512 \
  --steps 5 --warmup 2 --gradient_checkpointing true
