#!/usr/bin/env bash
# Issues 6 and 13's GPU benchmark, one prepared command for a lent GPU machine
# (see "The device" in ../shared/GUIDE.md): LoRA r 8 on q/k/v of the GLM-4-9B
# shape with random weights, bf16, synthetic tokens, done by `glm4 bench` and
# by the Python stack on the device's own PyTorch at four shapes (the
# tutorial's 2 x 512 with recompute, 2 x 4096 with recompute, 8 x 512, 2 x 512
# without recompute; 20 steps after 3 warm-up, fewer for the large ones);
# prints tokens/s, optimizer-step time, MFU (4·N FLOPs per token, 989 TFLOP/s
# bf16 peak) and peak memory for both. Needs no network and no weights; about
# 6-7 minutes of device time (GPU_BENCH_BUDGET_S stops starting runs after 420 s).
#
# Run from the repository root with the release binary built elsewhere and
# carried along (`target/release/glm4`). Python wheels in target/gpu_wheels/
# (TRL 1.16, transformers 5.23, PEFT 0.21 and TRL's datasets / dill /
# multiprocess, fetched with `pip download`, see docs/PERFORMANCE.md) are
# installed to /tmp first when present, so the Python side runs the same stack
# as `make bench`; without them it uses whatever the machine has: TRL if it
# imports, else transformers' Trainer + PEFT, else the Python half is skipped.
#
# Environment: PYTHON (default python3), GLM4_BIN, OUT (reports go there; default
# output/gpu_bench), GPU_BENCH_GC=0 to run only 2 x 512 without recompute,
# GPU_BENCH_BUDGET_S (default 420): later runs are skipped once it is spent;
# GPU_BENCH_ARGS replaces the benchmark arguments (dry runs on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BIN=${GLM4_BIN:-target/release/glm4}
OUTDIR=${OUT:-output/gpu_bench}
BUDGET=${GPU_BENCH_BUDGET_S:-420}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1

TORCH_LIB=$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
    echo "error: $PY has no torch"; exit 1; }
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

WHEELS=${GPU_WHEELS:-target/gpu_wheels}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/bench-site "$WHEELS"/*.whl >"$OUTDIR/pip.log" 2>&1; then
        export PYTHONPATH=/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}
        echo "installed $(ls "$WHEELS"/*.whl | wc -l) carried wheels into /tmp/bench-site"
    else
        echo "warning: installing the carried wheels failed (see $OUTDIR/pip.log); using the machine's packages"
    fi
fi

echo "== $(date -u +%Y-%m-%dT%H:%MZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$BIN" env || { echo "error: $BIN does not run here"; exit 1; }

ARGS=(--model_config glm-4-9b --random_init --dtype bfloat16 --device cuda --json)
# For a dry run of this script without a GPU, e.g.
# GPU_BENCH_ARGS="--model_config tiny --random_init --device cpu --dtype float32 --json"
# (each shape adds its batch, length, steps and recompute flags: leave those out)
if [[ -n ${GPU_BENCH_ARGS:-} ]]; then read -r -a ARGS <<<"$GPU_BENCH_ARGS"; fi

# Which Python trainer works here (each check takes seconds; a broken stack is skipped, not fatal).
PY_TRAINER=""
if "$PY" -c "import transformers, peft" >/dev/null 2>&1; then
    if "$PY" -c "import trl, datasets; datasets.Dataset.from_list([{'input_ids': [1, 2]}])" >"$OUTDIR/trl-check.log" 2>&1; then
        PY_TRAINER=trl
    else
        PY_TRAINER=transformers
        echo "note: TRL/datasets do not import here (see $OUTDIR/trl-check.log): Python side = transformers Trainer + PEFT"
    fi
    "$PY" -c "import torch, transformers, peft; print('python:', 'torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
else
    echo "note: transformers/peft are not installed for $PY: skipping the Python half"
fi

run() {  # run NAME TIMEOUT CMD...: JSON report to $OUTDIR/NAME.json, stderr to NAME.log
    local name=$1 limit=$2; shift 2
    if (( SECONDS > BUDGET )); then echo "skipped $name: ${SECONDS}s spent of the ${BUDGET}s budget"; return; fi
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUTDIR/$name.json" 2>"$OUTDIR/$name.log"
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s"
    if (( rc != 0 )); then tail -n 15 "$OUTDIR/$name.log"; rm -f "$OUTDIR/$name.json"; fi
}

# Shapes, most important first (the budget skips the tail): the tutorial's
# 2 x 512 with recompute; NeMo AutoModel's LoRA anchor, sequence 4096 x
# micro-batch 2 (recompute on: without it the activations of 40 layers x 8,192
# tokens do not fit beside the weights on the Python side); batch 8 x 512; and
# 2 x 512 without recompute. Larger shapes run fewer steps.
SHAPES=(
    "tut-gc|--batch_size 2 --seq_len 512 --gradient_checkpointing true --steps 20 --warmup 3"
    "s4096-gc|--batch_size 2 --seq_len 4096 --gradient_checkpointing true --steps 8 --warmup 2"
    "b8-nogc|--batch_size 8 --seq_len 512 --gradient_checkpointing false --steps 10 --warmup 2"
    "tut-nogc|--batch_size 2 --seq_len 512 --gradient_checkpointing false --steps 20 --warmup 3"
)
[[ "${GPU_BENCH_GC:-1}" == 0 ]] && SHAPES=("${SHAPES[3]}")
for shape in "${SHAPES[@]}"; do
    tag=${shape%%|*}
    read -r -a extra <<<"${shape#*|}"
    run "rust-$tag" 150 "$BIN" bench "${ARGS[@]}" "${extra[@]}"
    if [[ -n $PY_TRAINER ]]; then
        run "python-$tag" 200 "$PY" scripts/bench_trl.py "${ARGS[@]}" "${extra[@]}" --trainer "$PY_TRAINER"
    fi
done

"$PY" - "$OUTDIR" "${SHAPES[@]}" <<'PYEOF'
import json, os, sys
out, shapes = sys.argv[1], [s.split("|")[0] for s in sys.argv[2:]]
rows = []
for tag in shapes:
    for side in ("rust", "python"):
        p = os.path.join(out, f"{side}-{tag}.json")
        if os.path.exists(p) and os.path.getsize(p):
            lines = [l for l in open(p) if l.strip().startswith("{")]
            if lines:
                rows.append((tag, side, json.loads(lines[-1])))
if not rows:
    sys.exit("no results")
r0 = rows[0][2]
print(f"\n{r0['model_config']} shape ({r0['num_parameters'] / 1e9:.2f} B params), LoRA r {r0['lora_r']} on "
      f"{' '.join(r0['lora_target_modules'])}, {r0['dtype']}, synthetic tokens, on {r0.get('gpu_name') or r0.get('device')}")
head = (f"{'side':<32} {'batch x seq':>11} {'GC':<4} {'tokens/s':>9} {'s/step':>7} {'optim ms':>8} {'MFU':>6} "
        f"{'GPU used max MiB':>17} {'alloc/reserved MiB':>19} {'peak RSS MB':>11}")
print(head); print("-" * len(head))
for tag, side, r in rows:
    impl = "glm4 (Rust, tch)" if side == "rust" else r.get("implementation", "python")
    ar = "" if side == "rust" else f"{r.get('cuda_max_memory_allocated_mb')}/{r.get('cuda_max_memory_reserved_mb')}"
    if side == "rust" and r.get("cuda_max_memory_allocated_mb") is not None:
        ar = f"{r.get('cuda_max_memory_allocated_mb')}/{r.get('cuda_max_memory_reserved_mb')}"
    mfu = r.get("mfu")
    opt = (r.get("phase_seconds") or {}).get("optimizer")
    shape = f"{r['batch_size']} x {r['seq_len']}"
    print(f"{impl[:32]:<32} {shape:>11} {'on' if r.get('gradient_checkpointing') else 'off':<4} {r['tokens_per_second']:>9.1f} "
          f"{r['seconds_per_step']:>7.3f} {(1000 * opt if opt is not None else float('nan')):>8.2f} "
          f"{(100 * mfu if mfu else float('nan')):>5.1f}% {str(r.get('gpu_memory_used_max_mb')):>17} {ar:>19} {r['peak_rss_mb']:>11.0f}")
by = {(t, s): r for t, s, r in rows}
for tag in shapes:
    if (tag, "rust") in by and (tag, "python") in by:
        a, b = by[(tag, "rust")], by[(tag, "python")]
        speed = a["tokens_per_second"] / b["tokens_per_second"]
        ma, mb = a.get("gpu_memory_used_max_mb"), b.get("gpu_memory_used_max_mb")
        mem = f"{ma / mb:.2f}x" if ma and mb else "n/a"
        target = " (issue 13 target: >= 2x tokens/s at <= 0.8x peak allocated)" if tag == "tut-gc" else ""
        if tag == "s4096-gc" and a.get("mfu"):
            target = f" (issue 13 target: glm4 MFU >= 40 %: {100 * a['mfu']:.1f} %)"
        print(f"{tag:<9}: Rust/Python tokens/s {speed:.2f}x, GPU memory used {mem}{target}")
print("GPU memory used = nvidia-smi memory.used of the whole GPU, max of 100 ms samples: the caching allocator's "
      "peak reserved memory + the CUDA context (same measure on both sides). optim ms = mean optimizer step "
      "(on_pre_optimizer_step -> on_optimizer_step).")
PYEOF

# ---- Issue 13 items 3 and 4 (trl_like::ops, csrc/ops.cpp): a block of its own. ----
# The C++ operations checked on this device (varlen flash attention against one
# SDPA per sequence in bf16, the fused LM-head loss against the plain path at the
# GLM-4-9B head's shape, the allocator statistics): one JSON object, exit 1 when a
# check fails. Then the caching allocator's peaks of both sides' runs above
# (glm4 bench reads them through the same C++ shim torch.cuda uses).
# Build here first: cargo build --release -p trl_like --example ops_check
# (carry target/release/examples/ops_check with target/release/glm4).
OPS_BIN=${OPS_CHECK_BIN:-target/release/examples/ops_check}
if [[ -x $OPS_BIN ]]; then
    timeout 180 "$OPS_BIN" >"$OUTDIR/ops_check.json" 2>"$OUTDIR/ops_check.log"
    echo "ops_check: exit $? (report $OUTDIR/ops_check.json)"
    cat "$OUTDIR/ops_check.json"; tail -n 5 "$OUTDIR/ops_check.log"
else
    echo "skipped ops_check: $OPS_BIN is not built"
fi
"$PY" - "$OUTDIR" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
print("\ncaching allocator peaks (MiB; torch.cuda.max_memory_allocated / max_memory_reserved on both sides)")
for name in sorted(f for f in os.listdir(out) if f.endswith(".json") and f.split("-")[0] in ("rust", "python")):
    lines = [l for l in open(os.path.join(out, name)) if l.strip().startswith("{")]
    if lines:
        r = json.loads(lines[-1])
        print(f"  {name[:-5]:<24} allocated {r.get('cuda_max_memory_allocated_mb')}  reserved {r.get('cuda_max_memory_reserved_mb')}")
PYEOF

# ---- QLoRA (issue 14) ---------------------------------------------------------------
# The same work on a 4-bit NF4 + nested base, gradient checkpointing on (QLoRA needs it:
# a layer's dequantized weight lives until its backward). Targets: peak GPU memory
# <= 12 GB and <= 0.5x the bf16 LoRA run above. Rust side only: the device has no
# bitsandbytes wheel for the Python stack.
run "rust-qlora" 240 "$BIN" bench "${ARGS[@]}" --gradient_checkpointing true \
    --load_in_4bit true --use_bnb_nested_quant true
if [[ -f $OUTDIR/rust-qlora.json ]]; then
    grep "model memory after load" "$OUTDIR/rust-qlora.log"
    "$PY" - "$OUTDIR" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
q = json.load(open(os.path.join(out, "rust-qlora.json")))
mq = q.get("gpu_memory_used_max_mb")
print(f"QLoRA nf4+nested, GC on: tokens/s {q['tokens_per_second']:.1f}, GPU memory used max {mq} MiB (target <= 12288)")
p = os.path.join(out, "rust-gc.json")
if os.path.exists(p) and mq:
    b = json.load(open(p))
    mb = b.get("gpu_memory_used_max_mb")
    if mb:
        print(f"QLoRA / bf16 LoRA (GC on): GPU memory {mq / mb:.2f}x (target <= 0.5x), "
              f"tokens/s {q['tokens_per_second'] / b['tokens_per_second']:.2f}x")
PYEOF
fi
