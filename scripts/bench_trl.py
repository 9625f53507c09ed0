#!/usr/bin/env python3
"""The Python side of `make bench` and `scripts/gpu_bench.sh`: the same LoRA
training work as `glm4 bench`, done by TRL's SFTTrainer + PEFT (or, where TRL is
not installed, by transformers' Trainer + PEFT), measured the same way.

Same options as `glm4 bench` (see `glm4 bench --help`), plus `--trainer`.

What "the same work" means here:
- the same GLM-4 shape (presets `small`, `tiny`, `glm-4-9b`, or a config.json),
  random weights (initialised by transformers, so not the same numbers);
- the same token ids: synthetic ids come from the SplitMix64 stream `glm4 bench`
  uses; real records (alpaca) are rendered by the tutorial's `formatting_func`,
  eos-terminated, encoded with the tiny tokenizer and truncated to `--seq_len`
  exactly as glm4 does, then handed to the trainer pre-tokenized. (TRL left to
  tokenize the text itself would prefix every GLM-4 sequence with `[gMASK]<sop>`
  twice — see docs/PARITY.md — which is 2 more tokens per record.)
- LoRA with the same rank / alpha / dropout / targets, AdamW, linear schedule,
  clipping at 1.0, sequential batches, no evaluation / saving / logging;
- tokens/s measured from the end of the last warm-up step to the end of the
  last step (a TrainerCallback; CUDA synchronised), counting attention-mask
  tokens (`include_num_input_tokens_seen="non_padding"`); padding-free batches
  have no attention mask and no padding, and transformers would then count the
  tokens that differ from the pad id (eos here, which every record ends with),
  so those count every token of the row ("all");
- `--padding_free` / `--packing`: TRL's own options. TRL refuses padding_free
  without packing when max_length is set (it would not cap the concatenated
  row), so that run passes max_length=None; the records are truncated to
  `--seq_len` already, as glm4 truncates them.
- peak RSS from getrusage (ru_maxrss); on CUDA also torch.cuda.max_memory_allocated /
  max_memory_reserved and the same nvidia-smi sampling glm4 uses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

H100_BF16_PEAK_TFLOPS = 989.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIR = os.path.join(ROOT, "weights", "tiny-glm")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_config", "--model-config", required=True)
    p.add_argument("--random_init", "--random-init", nargs="?", const="true", default="false")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch_size", "--batch-size", type=int, default=4)
    p.add_argument("--seq_len", "--seq-len", type=int, default=512)
    p.add_argument("--lora_r", "--lora-r", type=int, default=8)
    p.add_argument("--lora_alpha", "--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora_dropout", "--lora-dropout", type=float, default=0.1)
    p.add_argument("--lora_target_modules", "--lora-target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--num_records", "--num-records", type=int, default=None)
    p.add_argument("--gradient_checkpointing", "--gradient-checkpointing", default="false")
    p.add_argument("--padding_free", "--padding-free", default="false")
    p.add_argument("--packing", default="false")
    p.add_argument("--packing_strategy", "--packing-strategy", choices=["bfd", "bfd_split", "wrapped"], default="bfd")
    p.add_argument("--learning_rate", "--learning-rate", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_threads", "--num-threads", type=int, default=None)
    p.add_argument("--peak_tflops", "--peak-tflops", type=float, default=None)
    p.add_argument("--json", nargs="?", const="true", default="false")
    # QLoRA (issue 14): transformers + bitsandbytes 4-bit base, compute dtype = --dtype.
    p.add_argument("--load_in_4bit", "--load-in-4bit", nargs="?", const="true", default="false")
    p.add_argument("--bnb_4bit_quant_type", "--bnb-4bit-quant-type", choices=["nf4", "fp4"], default="nf4")
    p.add_argument("--use_bnb_nested_quant", "--use-bnb-nested-quant", nargs="?", const="true", default="false")
    p.add_argument("--method", choices=["sft", "dpo"], default="sft",
                   help="sft (SFTTrainer) or dpo (DPOTrainer on a sharegpt preference file, e.g. data/demo_dpo.json)")
    p.add_argument("--ref_model", "--ref-model", choices=["none", "copy"], default="none",
                   help="dpo: none = PEFT reference by disabling the adapters (TRL's default with peft_config); "
                        "copy = an explicit frozen copy of the model passed as ref_model (two copies in memory)")
    p.add_argument("--trainer", choices=["auto", "trl", "transformers"], default="auto",
                   help="TRL SFTTrainer (auto: when importable) or transformers' Trainer")
    a = p.parse_args(argv)
    for name in ("random_init", "gradient_checkpointing", "padding_free", "packing", "json", "load_in_4bit",
                 "use_bnb_nested_quant"):
        v = str(getattr(a, name)).lower()
        if v not in ("true", "false", "1", "0", "yes", "no"):
            p.error(f"--{name} {v!r} is not true or false")
        setattr(a, name, v in ("true", "1", "yes"))
    return a


def splitmix64(seed):
    """The stream `glm4 bench` draws synthetic ids from (src/bench.rs)."""
    mask = (1 << 64) - 1
    state = seed & mask
    while True:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        yield z ^ (z >> 31)


def glm_config(name):
    """The presets of `glm4 bench` as transformers configs."""
    from transformers import GlmConfig

    def from_file(path):
        with open(path) as f:
            c = json.load(f)
        for k in ("architectures", "transformers_version", "dtype", "torch_dtype"):
            c.pop(k, None)
        return c

    if name in ("glm-4-9b", "glm4-9b", "glm-4-9b-hf"):
        # THUDM/glm-4-9b-hf's config.json (GlmConfig's defaults are these values).
        c = dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                 num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
                 hidden_act="silu", attention_bias=True, rms_norm_eps=1.5625e-07, max_position_embeddings=131072,
                 rope_theta=10000.0, pad_token_id=151329, eos_token_id=[151329, 151336, 151338],
                 tie_word_embeddings=False, initializer_range=0.02)
        return GlmConfig(**c), None
    if name == "small":
        c = from_file(os.path.join(TINY_DIR, "config.json"))
        c.update(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                 head_dim=64, intermediate_size=1536, vocab_size=2048)
        return GlmConfig(**c), None
    if name == "tiny":
        return GlmConfig(**from_file(os.path.join(TINY_DIR, "config.json"))), TINY_DIR
    path = name
    if os.path.isdir(path):
        return GlmConfig(**from_file(os.path.join(path, "config.json"))), path
    if os.path.isfile(path):
        return GlmConfig(**from_file(path)), None
    sys.exit(f"error: --model_config {name!r} is neither a preset (glm-4-9b, small, tiny) nor a config.json or model directory")


def num_parameters(cfg):
    """Same formula as GlmConfig::num_parameters in src/glm/config.rs."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    bias = q + 2 * kv if cfg.attention_bias else 0
    layer = h * (q + 2 * kv) + bias + q * h + h * 2 * i + i * h + 2 * h
    return v * h * 2 + cfg.num_hidden_layers * layer + h


def tutorial_formatting_func(tokenizer):
    # The tutorial's formatting_func, verbatim apart from the closure over `tokenizer`.
    def formatting_func(example):
        prompt = example["instruction"]
        if len(example["input"]) != 0:
            prompt += "\n\n" + example["input"]
        conversations = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": example["output"]},
        ]
        return tokenizer.apply_chat_template(conversation=conversations, tokenize=False)

    return formatting_func


def encode_once(tokenizer, text):
    """Encode with special tokens unless the text already starts with them (glm4's rule)."""
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    special = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(special) > len(plain) and special[len(special) - len(plain):] == plain:
        prefix = special[: len(special) - len(plain)]
        if plain[: len(prefix)] == prefix:
            return plain
    return special


def make_records(a, cfg, tokenizer):
    if a.data == "synthetic":
        rng = splitmix64(a.seed)
        count = a.batch_size * (a.warmup + a.steps)
        return [{"input_ids": [next(rng) % cfg.vocab_size for _ in range(a.seq_len)]} for _ in range(count)]
    with open(a.data, encoding="utf-8") as f:
        text = f.read().lstrip("\ufeff")
    raw = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    if a.num_records is not None:
        raw = raw[: a.num_records]
    fmt = tutorial_formatting_func(tokenizer)
    records = []
    for r in raw:
        if "input_ids" in r:
            ids = list(r["input_ids"])
            labels = list(r.get("labels") or ids)
        elif "instruction" in r and "output" in r:
            t = fmt(r)
            if tokenizer.eos_token and not t.endswith(tokenizer.eos_token):
                t += tokenizer.eos_token
            ids = encode_once(tokenizer, t)
            labels = list(ids)
        else:
            sys.exit(f"error: {a.data}: only alpaca records or {{\"input_ids\": [...]}} are supported here")
        # Truncated as glm4 does it; bfd_split and wrapped packing keep every token instead.
        keep = None if a.packing and a.packing_strategy != "bfd" else a.seq_len
        records.append({"input_ids": ids[:keep], "labels": labels[:keep]})
    return records


class GpuMemoryMonitor:
    """Max of `nvidia-smi --query-gpu=memory.used` sampled every 100 ms (as glm4 bench does)."""

    def __init__(self, index):
        self.first = None
        self.max = None
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "100", "-i", str(index)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        t0 = time.time()
        while self.first is None and time.time() - t0 < 5:
            time.sleep(0.02)

    def _read(self):
        for line in self.proc.stdout:
            try:
                v = int(line.strip())
            except ValueError:
                continue
            if self.first is None:
                self.first = v
            self.max = v if self.max is None else max(self.max, v)

    def finish(self):
        if self.proc is None:
            return None, None
        time.sleep(0.25)
        self.proc.kill()
        self.proc.wait()
        return self.first, self.max


def vm_rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# LLaMA-Factory's sharegpt roles -> chat roles (as scripts/make_dpo_fixtures.py and the Rust side map them).
ROLES = {"human": "user", "gpt": "assistant", "observation": "observation", "function_call": "assistant", "system": "system"}


def sharegpt_pair(r):
    """A sharegpt preference record as TRL's conversational prompt/chosen/rejected."""
    prompt = [{"role": ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]]
    if r.get("system"):
        prompt.insert(0, {"role": "system", "content": r["system"]})
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}]}


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    t_setup = time.time()
    import torch

    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device {a.device}: CUDA is not available")
    if device == "cuda":
        device = "cuda:0"
    dtype_name = a.dtype or ("float32" if device == "cpu" else "bfloat16")
    dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16}.get(dtype_name)
    if dtype is None:
        sys.exit(f"error: --dtype {dtype_name!r} is not one of float32, bfloat16, float16")

    import transformers
    from transformers import AutoTokenizer, GlmForCausalLM, TrainerCallback
    from peft import LoraConfig, get_peft_model

    use_trl = a.trainer in ("auto", "trl")
    try:
        import trl  # noqa: F401
        from trl import SFTConfig, SFTTrainer
    except ImportError as e:
        if a.trainer == "trl":
            sys.exit(f"error: TRL is not importable here ({e})")
        use_trl = False

    cfg, weights_dir = glm_config(a.model_config)
    if not a.random_init and weights_dir is None:
        sys.exit(f"error: --model_config {a.model_config}: no weights to load; pass --random_init")
    gpu = GpuMemoryMonitor(torch.device(device).index or 0) if device.startswith("cuda") else None

    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if a.method == "dpo":
        if a.data == "synthetic":
            sys.exit("error: --method dpo needs --data PATH to a preference file (e.g. data/demo_dpo.json)")
        with open(a.data, encoding="utf-8") as f:
            raw = json.load(f)
        records = [sharegpt_pair(r) for r in raw[: a.num_records]]
    else:
        if a.ref_model != "none":
            sys.exit("error: --ref_model is a --method dpo option")
        records = make_records(a, cfg, tokenizer)

    torch.manual_seed(a.seed)
    if a.random_init:
        # Built directly on the device in the target dtype: a 9B model never exists in fp32.
        with torch.device(device):
            model = GlmForCausalLM._from_config(cfg, dtype=dtype)
    else:
        model = GlmForCausalLM.from_pretrained(weights_dir, dtype=dtype).to(device)
    if a.load_in_4bit:
        # transformers quantizes in from_pretrained only: round-trip the (random) weights
        # through a temporary checkpoint, as TRL's get_quantization_config would load them.
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=a.bnb_4bit_quant_type,
                                 bnb_4bit_use_double_quant=a.use_bnb_nested_quant, bnb_4bit_compute_dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model
            model = GlmForCausalLM.from_pretrained(tmp, quantization_config=bnb, dtype=dtype,
                                                   device_map=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    rss_after_model = vm_rss_mb()
    n_params = sum(p.numel() for p in model.parameters())

    targets = "all-linear" if "all-linear" in a.lora_target_modules else a.lora_target_modules
    lora = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")

    from torch.utils.data import SequentialSampler

    class Timing(TrainerCallback):
        def __init__(self):
            self.begins, self.ends, self.pre_opt, self.opt = [], [], {}, {}
            self.cpu_ends = {}  # step -> CPU seconds of this process (robust to a busy machine)

        def _sync(self):
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kw):
            self._sync()
            self.begins.append((state.global_step, time.perf_counter()))

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self._sync()
            self.pre_opt[state.global_step] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            self._sync()
            self.opt[state.global_step] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self._sync()
            self.ends.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))
            ru = resource.getrusage(resource.RUSAGE_SELF)
            self.cpu_ends[state.global_step] = ru.ru_utime + ru.ru_stime

    timing = Timing()
    padding_free = a.padding_free or (a.packing and a.packing_strategy in ("bfd", "bfd_split"))
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    common = dict(
        output_dir=out_dir, max_steps=a.warmup + a.steps, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1, learning_rate=a.learning_rate, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, bf16=dtype == torch.bfloat16, gradient_checkpointing=a.gradient_checkpointing,
        logging_strategy="no", eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        seed=a.seed, use_cpu=device == "cpu", dataloader_num_workers=0,
        include_num_input_tokens_seen="all" if padding_free else "non_padding",
    )
    import dataclasses

    def sequential(cls):
        # Dataset order on both sides (transformers' train_sampling_strategy where it exists).
        class Seq(cls):
            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)
        return Seq

    if a.method == "dpo":
        if not use_trl:
            sys.exit("error: --method dpo needs TRL (transformers' Trainer has no DPO)")
        import copy

        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        ref = None
        if a.ref_model == "copy":
            # The two-copy setup: a frozen duplicate of the base as ref_model.
            ref = copy.deepcopy(model).eval()
            for p_ in ref.parameters():
                p_.requires_grad_(False)
        fields = {f.name for f in dataclasses.fields(DPOConfig)}
        extra = {"train_sampling_strategy": "sequential"} if "train_sampling_strategy" in fields else {}
        args = DPOConfig(max_length=a.seq_len, **common, **extra)
        trainer_cls = DPOTrainer if extra else sequential(DPOTrainer)
        trainer = trainer_cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(records),
                              processing_class=tokenizer, peft_config=lora, callbacks=[timing])
        implementation = f"TRL {trl.__version__} DPOTrainer + PEFT" + (" + ref copy" if ref is not None else "")
    elif use_trl:
        from datasets import Dataset

        fields = {f.name for f in dataclasses.fields(SFTConfig)}
        extra = {"train_sampling_strategy": "sequential"} if "train_sampling_strategy" in fields else {}
        if a.packing:
            shape = dict(max_length=a.seq_len, packing=True, packing_strategy=a.packing_strategy, padding_free=a.padding_free)
        elif a.padding_free:
            shape = dict(max_length=None, padding_free=True)
        else:
            shape = dict(max_length=a.seq_len)
        args = SFTConfig(pad_to_multiple_of=None, **shape, **common, **extra)
        trainer_cls = SFTTrainer if extra else sequential(SFTTrainer)
        trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(records),
                              processing_class=tokenizer, peft_config=lora, callbacks=[timing])
        implementation = f"TRL {trl.__version__} SFTTrainer + PEFT"
    else:
        from transformers import Trainer, TrainingArguments

        if a.padding_free or a.packing:
            sys.exit("error: --padding_free / --packing need TRL (transformers' Trainer has no such collator)")
        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        extra = {"train_sampling_strategy": "sequential"} if "train_sampling_strategy" in fields else {}
        args = TrainingArguments(remove_unused_columns=False, **common, **extra)
        pad = tokenizer.pad_token_id

        def collate(batch):
            width = max(len(r["input_ids"]) for r in batch)
            ids = [r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch]
            labels = [r.get("labels", r["input_ids"]) + [-100] * (width - len(r["input_ids"])) for r in batch]
            mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch]
            return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}

        if a.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, lora)
        trainer_cls = Trainer if extra else sequential(Trainer)
        trainer = trainer_cls(model=model, args=args, train_dataset=records, data_collator=collate,
                              processing_class=tokenizer, callbacks=[timing])
        implementation = f"transformers {transformers.__version__} Trainer + PEFT (no TRL)"

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if a.method == "dpo":
        # Both rows of each pair (prompt + chosen, prompt + rejected), as glm4 bench counts them.
        lens = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset]
    else:
        lens = [len(r["input_ids"]) for r in (trainer.train_dataset if use_trl else records)]
    setup_s = time.time() - t_setup
    t_train = time.time()
    # transformers prints its end-of-training metrics on stdout; keep stdout for the report.
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        out = trainer.train()
    train_s = time.time() - t_train

    ends = timing.ends
    if a.warmup == 0:
        t0, n0 = timing.begins[0][1], 0
    else:
        t0, n0 = next((t, n) for s, t, n in ends if s == a.warmup)
    last_step, t1, n1 = ends[-1]
    measured = last_step - a.warmup
    seconds = t1 - t0
    tokens = n1 - n0
    tps = tokens / seconds
    end_at = {s: t for s, t, _ in ends}
    step_seconds = [end_at[s + 1] - b for s, b in timing.begins if s >= a.warmup and s + 1 in end_at]
    phases = [(timing.pre_opt[s] - b, timing.opt[s] - timing.pre_opt[s], end_at[s + 1] - timing.opt[s])
              for s, b in timing.begins if s >= a.warmup and s + 1 in end_at and s in timing.pre_opt and s in timing.opt]
    phase_seconds = None
    if phases:
        mean = lambda i: round(sum(p[i] for p in phases) / len(phases), 4)  # noqa: E731
        phase_seconds = {"forward_backward": mean(0), "optimizer": mean(1), "rest": mean(2)}
    median = sorted(step_seconds)[len(step_seconds) // 2] if step_seconds else None
    flops_per_token = 4.0 * num_parameters(cfg)
    peak = a.peak_tflops or (H100_BF16_PEAK_TFLOPS if device.startswith("cuda") else None)
    gpu_first, gpu_max = gpu.finish() if gpu else (None, None)
    r = {
        "side": "python",
        "implementation": implementation,
        "method": a.method,
        "reference_model": ({"none": "adapters disabled (no copy)", "copy": "explicit ref_model copy"}[a.ref_model]
                            if a.method == "dpo" else None),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__ if use_trl else None, "peft": __import__("peft").__version__},
        "model_config": a.model_config,
        "num_parameters": n_params,
        "trainable_parameters": trainable,
        "dtype": dtype_name,
        "device": device,
        "gpu_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "num_threads": torch.get_num_threads(),
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "data": a.data,
        "num_records": len(lens),
        "dataset_tokens": sum(lens),
        "mean_record_tokens": round(sum(lens) / max(1, len(lens)), 1),
        "lora_r": a.lora_r,
        "lora_target_modules": a.lora_target_modules,
        "gradient_checkpointing": a.gradient_checkpointing,
        "padding_free": padding_free,
        "packing": a.packing,
        "packing_strategy": a.packing_strategy if a.packing else None,
        "warmup_steps": a.warmup,
        "measured_steps": measured,
        "measured_tokens": tokens,
        "measured_seconds": round(seconds, 4),
        "measured_cpu_seconds": (round(timing.cpu_ends[last_step] - timing.cpu_ends[a.warmup], 3)
                                 if a.warmup > 0 and a.warmup in timing.cpu_ends else None),
        "tokens_per_second": round(tps, 2),
        "seconds_per_step": round(seconds / measured, 4),
        "median_step_seconds": round(median, 4) if median is not None else None,
        "step_seconds": [round(s, 4) for s in step_seconds],
        "phase_seconds": phase_seconds,
        "train_loss": out.training_loss,
        "setup_seconds": round(setup_s, 2),
        "train_seconds": round(train_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_model_mb": round(rss_after_model, 1) if rss_after_model else None,
        "gpu_memory_used_max_mb": gpu_max,
        "gpu_memory_used_before_mb": gpu_first,
        "cuda_max_memory_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None,
        "cuda_max_memory_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20) if device.startswith("cuda") else None,
        "flops_per_token": flops_per_token,
        "peak_tflops": peak,
        "mfu": round(tps * flops_per_token / (peak * 1e12), 4) if peak else None,
    }
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{implementation} — {a.model_config} ({n_params / 1e6:.1f} M parameters, {trainable} trainable), {dtype_name} on {device}")
        print(f"  tokens/s  {tps:.1f}   s/step {seconds / measured:.4f}   peak RSS {r['peak_rss_mb']:.1f} MB")
        if r["mfu"] is not None:
            print(f"  MFU {100 * r['mfu']:.1f} %   GPU memory used max {gpu_max} MiB   "
                  f"max allocated {r['cuda_max_memory_allocated_mb']} MiB, reserved {r['cuda_max_memory_reserved_mb']} MiB")
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
