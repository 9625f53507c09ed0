#!/usr/bin/env python3
"""Reference fixtures for the Rust trainer, produced by real TRL / transformers / PEFT.

Versions: trl 1.16.0, transformers 5.23.0, peft 0.21.2, torch 2.11 (scripts/requirements-ref.txt).
Model: weights/tiny-glm (made by scripts/make_tiny_models.py). Data: data/demo_alpaca.json and
data/demo_toolcall.json (made by scripts/make_demo_data.py). Everything runs on the CPU in fp32,
with fixed seeds, no dropout and no shuffling, so two runs write byte-identical files.

Writes tests/fixtures/trainer/:

  dataset.json                 TRL's own dataset preparation (SFTTrainer.train_dataset) for the
                               tutorial's alpaca `formatting_func` and for the tool-call
                               ("sharegpt") mapping of the tutorial repository's toolcall_train.py
  b1/ b4/ b2_ga2/              4 optimizer steps of SFTTrainer + LoRA for three batch layouts:
      adapter_init/            the adapter before training (identical in the three folders)
      adapter_final/           the adapter after 4 steps
      log_history.json         trainer.state.log_history (timing values set to null)
      batches.json             every micro-batch fed to the model, in order, with
                               num_items_in_batch and the loss compute_loss returned
  schedulers.json              transformers.get_scheduler learning rates, steps 0..100
  peft_adapter/                a PEFT LoRA adapter with non-zero A and B
  peft_adapter_expected.safetensors   input_ids / attention_mask / logits / merged_logits
  greedy.json                  greedy generation with that adapter
  adamw.json                   torch.optim.AdamW on fixed parameters and gradients
  README.md                    what the files mean, and how TRL 1.16 normalises the loss

Run from anywhere: `.venv/bin/python scripts/make_trainer_fixtures.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Relative paths keep the absolute checkout path out of adapter_config.json
# ("base_model_name_or_path": "weights/tiny-glm").
os.chdir(ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

MODEL_DIR = "weights/tiny-glm"
ALPACA = "data/demo_alpaca.json"
TOOLCALL = "data/demo_toolcall.json"
OUT = Path("tests/fixtures/trainer")

datasets.disable_progress_bar()
datasets.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()
logging.getLogger("trl").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def dump_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def compact_json(path: Path, obj) -> None:
    """One line per list of ints keeps big id arrays readable and small."""
    text = json.dumps(obj, ensure_ascii=False, indent=1)
    # Collapse runs of numbers that json put on separate lines.
    import re

    def join(m: re.Match) -> str:
        inner = re.sub(r"\s+", "", m.group(0))
        return inner.replace(",", ", ")

    text = re.sub(r"\[\s*-?\d+(?:\.\d+)?(?:e-?\d+)?(?:,\s*-?\d+(?:\.\d+)?(?:e-?\d+)?)*\s*\]", join, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def load_tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def load_model():
    # fp32 on CPU; sdpa attention (transformers' default), as in scripts/make_fixtures.py.
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)


def alpaca_formatting_func(tokenizer):
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


def sharegpt_to_messages(record) -> list[dict]:
    # The tutorial repository's toolcall_train.py mapping.
    tools = json.loads(record["tools"])
    messages = [
        {
            "role": "system",
            "content": "",
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": t["name"],
                        "description": t["description"],
                        "parameters": t["parameters"],
                    },
                }
                for t in tools
            ],
        }
    ]
    for turn in record["conversations"]:
        if turn["from"] == "human":
            role = "user"
        elif turn["from"] == "observation":
            role = "observation"
        else:
            role = "assistant"
        messages.append({"role": role, "content": turn["value"]})
    return messages


def base_args(tmp: str, **kw) -> SFTConfig:
    args = dict(
        output_dir=tmp,
        use_cpu=True,
        report_to="none",
        dataloader_num_workers=0,
        bf16=False,  # TRL's default is bf16=True
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is True; numerically the same, slower
        seed=42,
        data_seed=42,
        save_strategy="no",
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    args.update(kw)
    return SFTConfig(**args)


def read_json(path: str):
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# (a) dataset preparation
# ---------------------------------------------------------------------------------------------


def make_dataset_fixture(tokenizer) -> dict:
    alpaca = read_json(ALPACA)
    toolcall = read_json(TOOLCALL)
    fmt = alpaca_formatting_func(tokenizer)
    model = load_model()
    cases = []

    def run_case(name, data_file, fmt_name, max_length, raw_records, dataset, formatting_func, texts_in):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = SFTTrainer(
                model=model,
                args=base_args(tmp, max_length=max_length),
                train_dataset=dataset,
                processing_class=tokenizer,
                formatting_func=formatting_func,
            )
            ds = trainer.train_dataset
            columns = list(ds.column_names)
            records = []
            for i, row in enumerate(ds):
                rec = {"text": texts_in[i], "trl_text": row["text"], "input_ids": row["input_ids"]}
                for col in ("labels", "completion_mask", "assistant_masks", "seq_lengths"):
                    if col in row:
                        rec[col] = row[col]
                # Reference: the text TRL tokenized, tokenised here with and without special tokens.
                rec["untruncated_len"] = len(tokenizer(row["text"])["input_ids"])
                records.append(rec)
        cases.append(
            {
                "name": name,
                "data_file": data_file,
                "format": fmt_name,
                "max_length": max_length,
                "columns": columns,
                "records": records,
            }
        )

    alp6 = alpaca[:6]
    alp_texts = [fmt(r) for r in alp6]
    for ml in (64, 16):
        run_case(f"alpaca_max{ml}", ALPACA, "alpaca", ml, alp6, Dataset.from_list(alp6), fmt, alp_texts)

    tc4 = toolcall[:4]
    tc_texts = [tokenizer.apply_chat_template(conversation=sharegpt_to_messages(r), tokenize=False) for r in tc4]
    # A plain "text" dataset: a "conversations" column would make TRL convert the rows to ChatML itself.
    tc_ds = Dataset.from_list([{"text": t} for t in tc_texts])
    for ml in (64, 1024):
        run_case(f"sharegpt_max{ml}", TOOLCALL, "sharegpt", ml, tc4, tc_ds, None, tc_texts)

    # Facts about what TRL did, checked on every record.
    eos = tokenizer.eos_token
    prefix = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    appended, doubled = [], []
    for case in cases:
        for rec in case["records"]:
            appended.append(rec["trl_text"] == rec["text"] + eos and not rec["text"].endswith(eos))
            doubled.append(rec["input_ids"][:4] == prefix + prefix if len(rec["input_ids"]) >= 4 else None)
    alpaca_full = cases[0]["records"][0]
    notes = {
        "eos_token": eos,
        "eos_token_id": tokenizer.eos_token_id,
        "eos_appended_to_text": all(appended),
        "tokenized_with": "processing_class(text=...) i.e. add_special_tokens=True (trl/data_utils.py:399)",
        "post_processor_prefix_ids": prefix,
        "special_tokens_added": all(d for d in doubled if d is not None),
        "chat_template_prefix_doubled": (
            "The chat template already starts with [gMASK]<sop> and the tokenizer's post-processor adds "
            "[gMASK]<sop> again, so every TRL sequence starts with [gMASK]<sop>[gMASK]<sop>"
        ),
        "labels_equal_input_ids": all(r["labels"] == r["input_ids"] for c in cases for r in c["records"]),
        "last_token_is_eos_when_untruncated": alpaca_full["input_ids"][-1] == tokenizer.eos_token_id,
        "truncation": "keep_start: input_ids[:max_length] and labels[:max_length] (sft_trainer.py:1439-1452); "
        "the eos is cut off too",
    }
    del model
    return {"trl_version": trl.__version__, "notes": notes, "cases": cases}


# ---------------------------------------------------------------------------------------------
# (b) training steps
# ---------------------------------------------------------------------------------------------

LORA = dict(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM")
SETTINGS = {
    "b1": dict(per_device_train_batch_size=1, gradient_accumulation_steps=1),
    "b4": dict(per_device_train_batch_size=4, gradient_accumulation_steps=1),
    "b2_ga2": dict(per_device_train_batch_size=2, gradient_accumulation_steps=2),
}
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


class SequentialSFTTrainer(SFTTrainer):
    """SFTTrainer without shuffling that records every micro-batch it trains on."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.captured = []

    # transformers 5.23 trainer.py:1071: `_get_train_sampler(self, train_dataset=None)`
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rec = {
            "step": self.state.global_step + 1,
            "input_ids": inputs["input_ids"].tolist(),
            "attention_mask": inputs["attention_mask"].tolist(),
            "labels": inputs["labels"].tolist(),
            "num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch),
            "keys": sorted(inputs.keys()),
        }
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        rec["loss"] = float((loss[0] if isinstance(loss, tuple) else loss).detach())
        if model.training:
            # This micro-batch's own metric values (SFTTrainer.log later averages them per window).
            m = self._metrics["train"]
            rec["entropy"] = m["entropy"][-1]
            rec["mean_token_accuracy"] = m["mean_token_accuracy"][-1]
            rec["num_tokens_total"] = m["num_tokens"][-1]
            self.captured.append(rec)
        return loss


def alpaca16(tokenizer):
    return Dataset.from_list(read_json(ALPACA)[:16])


def window_nll(model, micro_batches) -> float:
    """Token-mean NLL of the plain HF forward (no fused head) over all micro-batches of one step."""
    total, count = 0.0, 0
    with torch.no_grad():
        for mb in micro_batches:
            ids = torch.tensor(mb["input_ids"])
            am = torch.tensor(mb["attention_mask"])
            labels = torch.tensor(mb["labels"])
            logits = model(input_ids=ids, attention_mask=am).logits.float()
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            shift_labels = labels[:, 1:].reshape(-1)
            total += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
            count += int((shift_labels != -100).sum())
    return total / count


def save_adapter(model, path: Path) -> None:
    """`save_pretrained` without PEFT's generated model card (README.md), which the tests don't need."""
    model.save_pretrained(str(path))
    card = path / "README.md"
    if card.exists():
        card.unlink()
    # PEFT keeps target_modules as a set, so its order in adapter_config.json follows Python's
    # per-process string hashing; sort it (the loaded config is a set either way). Same format as
    # peft/config.py:163 (indent=2, sort_keys=True, no trailing newline).
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")


def make_init_adapter(path: Path) -> None:
    torch.manual_seed(42)
    model = get_peft_model(load_model(), LoraConfig(**LORA))
    save_adapter(model, path)


def train_setting(name: str, tokenizer, init_dir: Path) -> dict:
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(init_dir, out / "adapter_init")

    torch.manual_seed(42)
    base = load_model()
    model = PeftModel.from_pretrained(base, str(out / "adapter_init"), is_trainable=True)
    init_state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}

    with tempfile.TemporaryDirectory() as tmp:
        args = base_args(
            tmp,
            max_length=64,
            max_steps=4,
            learning_rate=5e-4,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            optim="adamw_torch",
            max_grad_norm=1.0,
            logging_steps=1,
            **SETTINGS[name],
        )
        trainer = SequentialSFTTrainer(
            model=model,
            args=args,
            train_dataset=alpaca16(tokenizer),
            processing_class=tokenizer,
            formatting_func=alpaca_formatting_func(tokenizer),
        )
        # TRL must not have re-initialised the adapter.
        now = {k: v for k, v in trainer.model.state_dict().items() if "lora_" in k}
        assert now.keys() == init_state.keys()
        assert all(torch.equal(now[k], init_state[k]) for k in now), "adapter changed before training"
        trainer.train()
        facts = {
            "model_accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
            "loss_is_scaled_for_ga": trainer.loss_is_scaled_for_ga,
            "loss_shifts_labels": trainer._loss_shifts_labels,
            "optimizer": type(trainer.optimizer).__name__,
            "optimizer_groups": [
                {"n_params": len(g["params"]), "weight_decay": g["weight_decay"]} for g in trainer.optimizer.param_groups
            ],
            "optimizer_defaults": {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in trainer.optimizer.defaults.items()
                if k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused", "maximize")
            },
            "trainable_parameters": sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad),
        }
        log_history = copy.deepcopy(trainer.state.log_history)
        for entry in log_history:
            for k in TIMING_KEYS:
                if k in entry:
                    entry[k] = None
        save_adapter(trainer.model, out / "adapter_final")
        captured = trainer.captured

    # First-step loss == base model loss (lora_B is zero at init), recomputed with a plain forward.
    first = [mb for mb in captured if mb["step"] == 1]
    ref = window_nll(base_reference(), first)
    logged = [e for e in log_history if "loss" in e and "train_loss" not in e]
    assert abs(logged[0]["loss"] - ref) < 1e-5, (logged[0]["loss"], ref)

    compact_json(out / "log_history.json", log_history)
    compact_json(
        out / "batches.json",
        {"setting": name, **SETTINGS[name], "trainer_facts": facts, "micro_batches": captured},
    )
    return {
        "facts": facts,
        "first_step_reference_loss": ref,
        "log": logged,
        "train": [e for e in log_history if "train_loss" in e][0],
        "captured": captured,
    }


_BASE = None


def base_reference():
    global _BASE
    if _BASE is None:
        _BASE = load_model().eval()
    return _BASE


# ---------------------------------------------------------------------------------------------
# (c) schedulers
# ---------------------------------------------------------------------------------------------


def make_schedulers() -> dict:
    specs = {
        "linear": {},
        "cosine": {},
        "cosine_with_restarts": {"num_cycles": 2},
        "polynomial": {"power": 2.0, "lr_end": 1e-7},
        "constant": {},
        "constant_with_warmup": {},
        "cosine_with_min_lr": {"min_lr_rate": 0.1},
    }
    out = {}
    for name, kw in specs.items():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=5e-4)
        sched = get_scheduler(
            name, opt, num_warmup_steps=10, num_training_steps=100, scheduler_specific_kwargs=dict(kw) or None
        )
        lrs = []
        for _ in range(101):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        out[name] = {
            "kwargs": kw,
            "warmup": 10,
            "total": 100,
            "base_lr": 5e-4,
            "lrs": lrs,
        }
    out["constant"]["note"] = "get_scheduler ignores num_warmup_steps for 'constant' (optimization.py:1014-1015)"
    return out


# ---------------------------------------------------------------------------------------------
# (d) PEFT adapter with non-zero weights
# ---------------------------------------------------------------------------------------------


def make_peft_adapter(tokenizer) -> dict:
    torch.manual_seed(1234)
    base = load_model()
    cfg = LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    out = OUT / "peft_adapter"
    if out.exists():
        shutil.rmtree(out)
    save_adapter(model, out)
    model.eval()

    prompts = ["你好，告诉我你的名字。", "What is 2+5?"]
    enc = [tokenizer.encode(p) for p in prompts]  # add_special_tokens=True: [gMASK]<sop> prefix
    L = max(len(e) for e in enc)
    ids = torch.full((len(enc), L), tokenizer.pad_token_id, dtype=torch.long)
    am = torch.zeros((len(enc), L), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        am[i, : len(e)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits.float().contiguous()
        with model.disable_adapter():
            base_logits = model(input_ids=ids, attention_mask=am).logits.float()

    prompt = tokenizer.encode("你好")
    with torch.no_grad():
        gen_ids = model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )[0].tolist()

    merged = model.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, attention_mask=am).logits.float().contiguous()
        merged_gen = merged.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )[0].tolist()

    mask = am.bool()
    diff_merge = (logits - merged_logits)[mask].abs().max().item()
    diff_base = (logits - base_logits)[mask].abs().max().item()
    assert diff_merge < 1e-4, diff_merge
    assert diff_base > 1e-2, "adapter has no visible effect"
    assert merged_gen == gen_ids

    save_file(
        {"input_ids": ids, "attention_mask": am, "logits": logits, "merged_logits": merged_logits},
        str(OUT / "peft_adapter_expected.safetensors"),
        # One key only: safetensors orders several metadata keys by a per-process hash.
        metadata={"source": f"scripts/make_trainer_fixtures.py ({MODEL_DIR})"},
    )
    greedy = {
        "adapter": "tests/fixtures/trainer/peft_adapter",
        "base_model": MODEL_DIR,
        "prompt": "你好",
        "prompt_ids": prompt,
        "max_new_tokens": 10,
        "output_ids": gen_ids,
        "new_ids": gen_ids[len(prompt):],
        "new_text": tokenizer.decode(gen_ids[len(prompt):], skip_special_tokens=False),
        "merged_output_ids_equal": merged_gen == gen_ids,
    }
    dump_json(OUT / "greedy.json", greedy)

    # The merged model as transformers 5 saves it (not kept in the repository).
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
        keys = sorted(load_file(os.path.join(tmp, "model.safetensors")).keys()) if "model.safetensors" in files else []
    adapter_keys = sorted(load_file(str(out / "adapter_model.safetensors")).keys())
    return {
        "max_abs_diff_peft_vs_merged": diff_merge,
        "max_abs_diff_peft_vs_base": diff_base,
        "merged_files": files,
        "merged_keys": keys,
        "adapter_keys": adapter_keys,
        "greedy": greedy,
    }


# ---------------------------------------------------------------------------------------------
# (e) AdamW semantics
# ---------------------------------------------------------------------------------------------


def make_adamw() -> dict:
    p_init = [[round(0.1 * (i * 4 + j) - 0.55, 4) for j in range(4)] for i in range(3)]
    b_init = [0.5, -0.25, 0.125, 0.0]
    # Fixed gradients: simple closed forms, rounded so the file holds the exact fp32 inputs.
    grads_p = [
        [[round(((t + 1) * (i + 2 * j + 1)) % 7 / 7.0 - 0.4, 4) for j in range(4)] for i in range(3)]
        for t in range(5)
    ]
    grads_b = [[round(((t + 2) * (j + 1)) % 5 / 5.0 - 0.3, 4) for j in range(4)] for t in range(5)]

    p = torch.nn.Parameter(torch.tensor(p_init, dtype=torch.float32))
    b = torch.nn.Parameter(torch.tensor(b_init, dtype=torch.float32))
    opt = torch.optim.AdamW(
        [{"params": [p], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False,
    )
    steps = []
    for t in range(5):
        p.grad = torch.tensor(grads_p[t], dtype=torch.float32)
        b.grad = torch.tensor(grads_b[t], dtype=torch.float32)
        opt.step()
        steps.append(
            {
                "p0": p.detach().tolist(),
                "b0": b.detach().tolist(),
                "p0_exp_avg": opt.state[p]["exp_avg"].tolist(),
                "p0_exp_avg_sq": opt.state[p]["exp_avg_sq"].tolist(),
            }
        )
    return {
        "optimizer": "torch.optim.AdamW",
        "lr": 1e-2,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "groups": [{"params": ["p0"], "weight_decay": 0.1}, {"params": ["b0"], "weight_decay": 0.0}],
        "update_rule": (
            "p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; "
            "p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)"
        ),
        "p0_init": p_init,
        "b0_init": b_init,
        "grads_p0": grads_p,
        "grads_b0": grads_b,
        "steps": steps,
    }


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------

README = """\
# Trainer fixtures (TRL {trl} / transformers {tf} / PEFT {peft} / torch {torch})

Written by `scripts/make_trainer_fixtures.py` from `weights/tiny-glm` and `data/demo_*.json`
(`scripts/make_demo_data.py`). CPU, fp32, seed 42, LoRA dropout 0, no shuffling: regenerating
gives byte-identical files. Do not edit by hand. Source references are to the installed
packages under `.venv/lib/python3.11/site-packages/`.

## dataset.json: TRL's dataset preparation

`SFTTrainer(model, args=SFTConfig(max_length=N), train_dataset, processing_class=tokenizer,
formatting_func=...)`, then `trainer.train_dataset`. Cases: `alpaca_max64`, `alpaca_max16` (first
6 records of demo_alpaca.json, the tutorial's formatting_func), `sharegpt_max64`,
`sharegpt_max1024` (first 4 records of demo_toolcall.json, toolcall_train.py's mapping rendered
with `apply_chat_template(conversation=..., tokenize=False)` and passed as a plain `text` column,
`dataset_text_field="text"`). Per record: `text` (what went in), `trl_text` (the `text` column
after TRL), `input_ids`, `labels`, `untruncated_len` (length of the tokenized `trl_text`).
`columns` lists the prepared dataset's columns; the Trainer drops all but input_ids / labels /
seq_lengths when it builds the DataLoader (`remove_unused_columns`).

* EOS: TRL appends `eos_token` (`<|endoftext|>`, 1900) when the text does not already end with it
  (trl/trainer/sft_trainer.py:1292-1297, `add_eos`). Appended here: {eos_appended}.
* Special tokens: plain text is tokenized by `_tokenize(processing_class, example["text"], ...)`
  (sft_trainer.py:1381-1384) = `processing_class(text=input)` (trl/data_utils.py:399), i.e. with
  **add_special_tokens=True**. The GLM-4 post-processor prepends `[gMASK]<sop>` and the chat
  template already starts with `[gMASK]<sop>`, so every sequence starts with
  `[gMASK]<sop>[gMASK]<sop>` (ids {prefix} twice). Added here: {special}.
* `labels` is a dataset column built during preparation (sft_trainer.py:1412-1427); without a
  completion or assistant mask labels == input_ids (loss on every token, prompt included).
  No `completion_mask` / `assistant_masks` columns appear for these datasets.
* Truncation (`truncation_mode="keep_start"`, sft_trainer.py:1439-1452) keeps
  `input_ids[:max_length]` and `labels[:max_length]`: the appended eos is cut off as well.
* A `conversations` column of from/value turns would be converted to ChatML by TRL itself
  (sft_trainer.py:1274-1283) and tokenized with `apply_chat_template(messages,
  tools=json.loads(row["tools"]))`, not with toolcall_train.py's mapping; so the tool-call case
  passes only a `text` column.

## b1 / b4 / b2_ga2: four optimizer steps

LoRA r=8, alpha=32 (scaling 4), dropout 0, q/k/v_proj; AdamW (`adamw_torch`; one group, weight
decay 0), lr 5e-4 linear to 0 over 4 steps, no warmup, max_grad_norm 1.0, max_length 64, the
first 16 records of demo_alpaca.json in order (`_get_train_sampler` returns a
`SequentialSampler`). `adapter_init/` is the same in the three folders (PEFT's own init under
`torch.manual_seed(42)`: kaiming-uniform lora_A, zero lora_B); each run loads it with
`PeftModel.from_pretrained(base, dir, is_trainable=True)`. The script asserts that TRL left it
unchanged and that the first logged loss equals the base model's token-mean NLL over the first
step's micro-batches (plain HF forward; B = 0). PEFT's generated model-card README.md is not kept.

`batches.json`: `trainer_facts` (model_accepts_loss_kwargs, optimizer groups, trainable parameter
names) and `micro_batches[k]` = {{step, input_ids, attention_mask, labels, num_items_in_batch,
loss, entropy, mean_token_accuracy, num_tokens_total, keys}} in the order the model saw them. Right padding with
`<|endoftext|>` (1900), attention_mask 0 and labels -100 on pads. `loss` is what
`compute_loss` returned for that micro-batch (already divided by the window's token count).

| setting | logged loss, steps 1-4 | grad_norm (pre-clip), steps 1-4 | train_loss |
|---|---|---|---|
{table}

### Loss normalisation with gradient accumulation

1. transformers/trainer.py:2327-2335 (`_get_num_items_in_batch`), once per optimizer step over
   all micro-batches of the window:
   `num_items_in_batch = sum(labels.ne(-100).sum() for labels in labels_for_count)` where
   `labels_for_count` is `batch["labels"][..., 1:]` (shifted, since `_loss_shifts_labels` is True
   for causal LMs, trainer.py:543).
2. trl/trainer/sft_trainer.py:1611-1618 (`SFTTrainer.compute_loss`):
   ```python
   outputs = model(**inputs, fused_lm_head=True)
   per_token_loss = -outputs.log_probs  # zero on ignored positions
   num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
   loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
   ```
   The fused head scores `last_hidden_state[:, :-1]` against `labels[:, 1:]`, mask
   `labels != -100` (trl/trainer/utils.py:1618-1627). So each micro-batch returns
   (sum of its token NLLs) / (target tokens of the whole window).
3. transformers/trainer.py:2107-2111 (`training_step`):
   `loss_is_scaled_for_ga = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or
   self.compute_loss_func is not None`; `if not loss_is_scaled_for_ga: loss = loss /
   self.current_gradient_accumulation_steps`. Here model_accepts_loss_kwargs = {accepts}
   (trainer.py:517-518), so there is no extra division by gradient_accumulation_steps.
4. trainer.py:1923 `self._tr_loss += tr_loss_step` sums the micro-batch losses; trainer.py:2249-2254
   logs `loss = tr_loss_scalar / (global_step - _globalstep_last_logged)`. With logging_steps=1 the
   logged loss of b2_ga2 is the sum of its two micro-batch losses = the token-weighted mean NLL
   over the 4 sequences of the step (not the mean of the two micro-batch means), the same number
   b4 logs for the same 4 sequences. The gradient is that of the same token mean.
5. The final entry's `train_loss` = sum of the logged step losses / global_step
   (trainer.py:1998-2000).

### Other logged values (keys per step: loss, grad_norm, learning_rate, entropy, mean_token_accuracy, num_tokens, epoch, step)

* `grad_norm`: total 2-norm of all trainable (LoRA) gradients before clipping
  (trainer.py:1931 -> 2779 `accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)`).
* `learning_rate`: the lr the optimizer used for this step, read after `optimizer.step()` and
  before `lr_scheduler.step()` (trainer.py:1939-1944): 5e-4, 3.75e-4, 2.5e-4, 1.25e-4.
* `entropy` (sft_trainer.py:1640-1643): per micro-batch, the sum over positions whose next-token
  label is not -100 of the entropy of softmax(logits) at that position, divided by the number of
  such positions. The kernel computes it as `entropy = log_z - x_sum_exp / sum_exp`
  (trl/kernels/chunked_logprob.py:380), i.e. logsumexp(z) - sum_v p_v z_v = -sum_v p_v log p_v.
* `mean_token_accuracy` (sft_trainer.py:1642-1644): per micro-batch, (# positions whose label is
  the argmax of the logits) / (# positions with a label). `is_top1 = (target_logit >= running_max)
  & (target_logit > max_before_target)` (chunked_logprob.py:383): on a tie the label counts only if
  it is the first maximum, as `argmax` would. (0.0 throughout here: the tiny model is random.)
* Both metrics are averaged as **plain means over the micro-batches** of the logging window
  (`SFTTrainer.log`, sft_trainer.py:1697: `sum(val) / len(val)`), not token-weighted; b4 and b2_ga2
  therefore log slightly different entropies for the same sequences.
* `num_tokens` (sft_trainer.py:1649-1657): running total of `attention_mask.sum()` over every
  micro-batch trained so far: pads excluded, every real token (the first one and the eos included).
* `epoch` = `epoch + (step + 1) / steps_in_epoch` (trainer.py:1948), steps_in_epoch = number of
  micro-batches per epoch (16, 4 and 8 for b1, b4, b2_ga2).
* Final entry: `train_runtime`, `train_samples_per_second`, `train_steps_per_second` (timing; set
  to null in these files), `total_flos`, `train_loss`, `epoch`, `step`.

## schedulers.json

`get_scheduler(name, AdamW(lr=5e-4), num_warmup_steps=10, num_training_steps=100,
scheduler_specific_kwargs=kwargs)`; `lrs[s]` = `get_last_lr()[0]` before the s-th
`scheduler.step()`, s = 0..100. `constant` ignores the warmup (transformers/optimization.py:1014-1015).

## peft_adapter/, peft_adapter_expected.safetensors, greedy.json

LoRA r=4, alpha=16 (scaling 4) on q_proj, v_proj, gate_up_proj, down_proj; lora_A ~ N(0, 0.1^2),
lora_B ~ N(0, 0.05^2) (torch.Generator seeded 1234, parameters in sorted-name order).
`input_ids` [2, L] right-padded with `attention_mask`; `logits` from the PeftModel, `merged_logits`
after `merge_and_unload()` (max abs difference {merge_diff:.2e} on unpadded positions; the adapter
moves the logits by up to {base_diff:.2f} from the base model's). `greedy.json`: greedy decoding
of `tokenizer.encode("你好")` (with `[gMASK]<sop>`), 10 new tokens, adapter active; the merged model
gives the same ids. The merged model saved with `save_pretrained` (not kept) writes
{merged_files}: one unsharded file with the plain HF keys (`model.layers.0.self_attn.q_proj.weight`,
..., `lm_head.weight`; no lora_* keys, no `base_model.model.` prefix).

## adamw.json

`torch.optim.AdamW` (foreach=False) with two groups (p0 with weight_decay 0.1, b0 with 0.0, as
transformers leaves biases and norm weights out of decay, trainer.py:1408-1418), lr 1e-2, betas
(0.9, 0.999), eps 1e-8, five steps with the stored gradients; parameters and p0's moments after
each step.
"""

def main() -> None:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    print(f"trl {trl.__version__} transformers {transformers.__version__} peft {peft.__version__} torch {torch.__version__}")

    ds = make_dataset_fixture(tokenizer)
    compact_json(OUT / "dataset.json", ds)
    print("dataset notes:", json.dumps(ds["notes"], ensure_ascii=False))

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        init_dir = Path(tmp) / "adapter_init"
        make_init_adapter(init_dir)
        for name in SETTINGS:
            results[name] = train_setting(name, tokenizer, init_dir)
            r = results[name]
            print(name, "ref", r["first_step_reference_loss"])
            for e in r["log"]:
                print("  ", {k: e[k] for k in ("loss", "grad_norm", "learning_rate", "entropy", "num_tokens", "mean_token_accuracy", "epoch")})
            print("  ", r["train"])
    print("facts:", json.dumps(results["b2_ga2"]["facts"], indent=None)[:2000])

    dump_json(OUT / "schedulers.json", make_schedulers())
    pa = make_peft_adapter(tokenizer)
    print("peft:", {k: v for k, v in pa.items() if k not in ("merged_keys", "adapter_keys")})
    print("merged keys:", pa["merged_keys"][:8], "...", len(pa["merged_keys"]))
    print("adapter keys:", pa["adapter_keys"][:4], "...", len(pa["adapter_keys"]))
    compact_json(OUT / "adamw.json", make_adamw())

    rows = []
    for name, r in results.items():
        losses = ", ".join(f"{e['loss']:.6f}" for e in r["log"])
        norms = ", ".join(f"{e['grad_norm']:.6f}" for e in r["log"])
        rows.append(f"| {name} | {losses} | {norms} | {r['train']['train_loss']:.6f} |")
    (OUT / "README.md").write_text(
        README.format(
            trl=trl.__version__, tf=transformers.__version__, peft=peft.__version__, torch=torch.__version__.split("+")[0],
            eos_appended=ds["notes"]["eos_appended_to_text"], special=ds["notes"]["special_tokens_added"],
            prefix=ds["notes"]["post_processor_prefix_ids"], table="\n".join(rows),
            accepts=results["b1"]["facts"]["model_accepts_loss_kwargs"],
            merge_diff=pa["max_abs_diff_peft_vs_merged"], base_diff=pa["max_abs_diff_peft_vs_base"],
            merged_files=", ".join(pa["merged_files"]),
        ),
        encoding="utf-8",
    )
    print("done")


if __name__ == "__main__":
    sys.exit(main())
