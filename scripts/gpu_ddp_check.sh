#!/usr/bin/env bash
# Issue 8's GPU check, for a lent GPU machine (see "The device" in the project's
# guide): data-parallel glm4 sft with the NCCL backend, world size 1 (the
# machines lent here have one GPU), launched by the machine's own torchrun.
# A single-process run and a Gloo run on the same GPU give the losses to compare
# with; NPROC_GPU=N makes the NCCL run a real N-GPU one on a bigger machine.
# Prints each run's losses; any failing run exits non-zero.
set -euo pipefail
PY=${PY:-/opt/torch/.venv/bin/python3}
TORCH_DIR="$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
TORCHRUN=("$PY" -m torch.distributed.run)
B=target/release/glm4
OUT_DIR=${OUT:-/tmp}/gpu_ddp
NPROC_GPU=${NPROC_GPU:-1}
rm -rf "$OUT_DIR"
$B env
common=(sft --model_name_or_path weights/tiny-glm --data_files data/demo_alpaca.json
  --dtype bfloat16 --bf16 true --lora_dropout 0 --max_steps 8 --save_steps 4 --logging_steps 1
  --eval_strategy no --predict_max_new_tokens 8 --disable_tqdm true --ddp_timeout 120)
losses() { "$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); print([round(e["loss"],5) for e in s["log_history"] if "loss" in e])' "$1/trainer_state.json"; }

echo "== single process (no process group)"
$B "${common[@]}" --output_dir "$OUT_DIR/single" --per_device_train_batch_size 4
losses "$OUT_DIR/single"
echo "== torchrun, NCCL, world size $NPROC_GPU"
"${TORCHRUN[@]}" --nproc_per_node "$NPROC_GPU" --master_addr 127.0.0.1 --master_port 29533 --no-python \
  $B "${common[@]}" --output_dir "$OUT_DIR/nccl" --per_device_train_batch_size $((4 / NPROC_GPU)) --ddp_backend nccl
losses "$OUT_DIR/nccl"
echo "== torchrun, Gloo on the same GPU (gradients reduced through host memory)"
"${TORCHRUN[@]}" --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29534 --no-python \
  $B "${common[@]}" --output_dir "$OUT_DIR/gloo" --per_device_train_batch_size 4 --ddp_backend gloo
losses "$OUT_DIR/gloo"

# ---------------------------------------------------------------------------
# Issue 15: ZeRO-2 with fp32 master weights (--deepspeed) over NCCL, world size
# NPROC_GPU, full fine-tuning of the tiny model; then a single process with the
# same config, to compare the losses with.
# ---------------------------------------------------------------------------
zero=(sft --model_name_or_path weights/tiny-glm --data_files data/demo_alpaca.json
  --bf16 true --use_peft false --learning_rate 5e-5 --max_steps 8 --save_steps 4 --logging_steps 1
  --eval_strategy no --no_predict --disable_tqdm true --ddp_timeout 120 --deepspeed configs/zero2.yaml)
echo "== torchrun, NCCL, ZeRO-2 (configs/zero2.yaml), world size $NPROC_GPU"
"${TORCHRUN[@]}" --nproc_per_node "$NPROC_GPU" --master_addr 127.0.0.1 --master_port 29535 --no-python \
  $B "${zero[@]}" --output_dir "$OUT_DIR/zero2_nccl" --per_device_train_batch_size $((4 / NPROC_GPU)) --ddp_backend nccl
losses "$OUT_DIR/zero2_nccl"
echo "== single process, ZeRO-2 config (fp32 masters, no process group)"
$B "${zero[@]}" --output_dir "$OUT_DIR/zero2_single" --per_device_train_batch_size 4
losses "$OUT_DIR/zero2_single"
