#!/usr/bin/env python3
"""Reference fixtures for the Rust DPOTrainer, produced by real TRL 1.16 / transformers / PEFT.

Model: weights/tiny-glm (scripts/make_tiny_models.py). Data: data/demo_dpo.json (the project's own
preference pairs, scripts/make_demo_data.py). CPU, fp32, fixed seeds, no shuffling.

Writes tests/fixtures/dpo/:

  tokenize.json      TRL's DPOTrainer dataset preparation (prompt_ids / chosen_ids / rejected_ids)
                     for the same six pairs in five layouts: conversational, standard (text),
                     implicit-prompt conversational, implicit-prompt standard, and the sharegpt
                     preference layout (converted to conversational with the mapping below); plus
                     DataCollatorForPreference's batches with max_length 24 (keep_start, keep_end)
                     and the pairs _prepare_dataset drops when the prompt fills max_length.
  {sigmoid,ipo,hinge}_b2_ga2/   4 optimizer steps of DPOTrainer + LoRA (batch 2, accumulation 2)
                     from an adapter with non-zero lora_B: TRL's reference is then a frozen copy
                     of that initial adapter ("ref"), so rewards are non-zero from step 1
  sigmoid_b2_ga2_fresh/  the same from a fresh PEFT adapter (lora_B zero): reference = the base
  full_sigmoid_b2_ga2/   full fine-tuning (reference: TRL's frozen copy of the model), with the final
                     weights of the last layer and the final norm (final_weights.safetensors)
      adapter_init/  the adapter before training
      adapter_final/ the adapter after 4 steps
      log_history.json  trainer.state.log_history (timing values set to null)
      batches.json   every micro-batch (input_ids, attention_mask, completion_mask) and its metrics

Run from anywhere: `.venv/bin/python scripts/make_dpo_fixtures.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.chdir(ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

MODEL_DIR = "weights/tiny-glm"
DATA = "data/demo_dpo.json"
OUT = Path("tests/fixtures/dpo")

datasets.disable_progress_bar()
datasets.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()
logging.getLogger("trl").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

# LLaMA-Factory's sharegpt roles → chat roles (the Rust side maps them the same way).
ROLES = {"human": "user", "gpt": "assistant", "observation": "observation", "function_call": "assistant", "system": "system"}


def dump_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, ensure_ascii=False, indent=1)
    import re

    def join(m):
        return re.sub(r"\s+", "", m.group(0)).replace(",", ", ")

    text = re.sub(r"\[\s*-?\d+(?:\.\d+)?(?:e-?\d+)?(?:,\s*-?\d+(?:\.\d+)?(?:e-?\d+)?)*\s*\]", join, text)
    path.write_text(text + "\n", encoding="utf-8")


def load_model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)


def sharegpt_to_conversational(r):
    prompt = [{"role": ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]]
    if r.get("system"):
        prompt.insert(0, {"role": "system", "content": r["system"]})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}],
    }


def layouts(raw):
    conv = [sharegpt_to_conversational(r) for r in raw]
    std = [
        {
            "prompt": "Question: " + c["prompt"][-1]["content"] + "\nAnswer:",
            "chosen": " " + c["chosen"][0]["content"],
            "rejected": " " + c["rejected"][0]["content"],
        }
        for c in conv
    ]
    return {
        "conversational": conv,
        "standard": std,
        "implicit_conversational": [
            {"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]} for c in conv
        ],
        "implicit_standard": [{"chosen": s["prompt"] + s["chosen"], "rejected": s["prompt"] + s["rejected"]} for s in std],
        "sharegpt": raw,
    }


def dpo_args(tmp, **kw):
    base = dict(
        output_dir=tmp,
        use_cpu=True,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        seed=42,
        data_seed=42,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return DPOConfig(**base)


def tokenize_fixture(tokenizer) -> dict:
    raw = json.loads(Path(DATA).read_text(encoding="utf-8"))[:6]
    out = {"records": {}, "expected": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, records in layouts(raw).items():
            out["records"][name] = records
            trl_records = [sharegpt_to_conversational(r) for r in records] if name == "sharegpt" else records
            trainer = DPOTrainer(
                model=load_model(),
                args=dpo_args(tmp, max_length=None),
                train_dataset=Dataset.from_list(trl_records),
                processing_class=tokenizer,
            )
            ds = trainer.train_dataset
            out["expected"][name] = [
                {"prompt_ids": e["prompt_ids"], "chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]}
                for e in ds
            ]
        # Truncation (in the collator) and the drop of pairs whose prompt fills max_length.
        conv = out["records"]["conversational"]
        for mode in ("keep_start", "keep_end"):
            trainer = DPOTrainer(
                model=load_model(),
                args=dpo_args(tmp, max_length=24, truncation_mode=mode),
                train_dataset=Dataset.from_list(conv),
                processing_class=tokenizer,
            )
            ds = trainer.train_dataset
            kept = [
                {"prompt_ids": e["prompt_ids"], "chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]}
                for e in ds
            ]
            batch = trainer.data_collator([dict(e) for e in kept])
            out["expected"]["truncation_" + mode] = {
                "max_length": 24,
                "kept": kept,
                "input_ids": batch["input_ids"].tolist(),
                "attention_mask": batch["attention_mask"].tolist(),
                "completion_mask": batch["completion_mask"].tolist(),
            }
    out["facts"] = {
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "note": "records of `sharegpt` are converted with sharegpt_to_conversational before TRL tokenizes them",
    }
    return out


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

LORA = dict(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM")
LOSSES = ("sigmoid", "ipo", "hinge")
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
METRICS = (
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class SequentialDPOTrainer(DPOTrainer):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.captured = []

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rec = {
            "step": self.state.global_step + 1,
            "input_ids": inputs["input_ids"].tolist(),
            "attention_mask": inputs["attention_mask"].tolist(),
            "completion_mask": inputs["completion_mask"].tolist(),
        }
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        rec["loss"] = float(loss.detach())
        if model.training:
            m = self._metrics["train"]
            for k in METRICS:
                rec[k] = m[k][-1]
            self.captured.append(rec)
        return loss


def save_adapter(model, path: Path) -> None:
    model.save_pretrained(str(path))
    card = path / "README.md"
    if card.exists():
        card.unlink()
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")


def train_setting(loss_type: str, tokenizer, init_dir: Path, suffix: str = "") -> dict:
    name = f"{loss_type}_b2_ga2{suffix}"
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(init_dir, out / "adapter_init")
    raw = json.loads(Path(DATA).read_text(encoding="utf-8"))[:16]
    torch.manual_seed(42)
    model = PeftModel.from_pretrained(load_model(), str(out / "adapter_init"), is_trainable=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = dpo_args(
            tmp,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=4,
            learning_rate=5e-4,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            optim="adamw_torch",
            max_grad_norm=1.0,
            logging_steps=1,
            beta=0.1,
            loss_type=[loss_type],
            max_length=64,
        )
        trainer = SequentialDPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([sharegpt_to_conversational(r) for r in raw]),
            processing_class=tokenizer,
        )
        trainer.train()
        facts = {
            "loss_is_scaled_for_ga": trainer.loss_is_scaled_for_ga,
            "model_accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
            "lora_dropout_p_after_disable_dropout": [
                m.p for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora" in n
            ][:1],
        }
        log_history = copy.deepcopy(trainer.state.log_history)
        for entry in log_history:
            for k in TIMING_KEYS:
                if k in entry:
                    entry[k] = None
        save_adapter(trainer.model, out / "adapter_final")
        captured = trainer.captured
    dump_json(out / "log_history.json", log_history)
    dump_json(out / "batches.json", {"setting": name, "trainer_facts": facts, "micro_batches": captured})
    return {"log": log_history, "facts": facts}


# Full fine-tuning: TRL's reference is a frozen copy of the model. The final weights of the last
# decoder layer and the final norm are kept (the embedding and lm_head would add 2 MB).
FULL_KEPT = ("model.layers.1.", "model.norm.")


def train_full(tokenizer) -> dict:
    name = "full_sigmoid_b2_ga2"
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    raw = json.loads(Path(DATA).read_text(encoding="utf-8"))[:16]
    torch.manual_seed(42)
    model = load_model()
    with tempfile.TemporaryDirectory() as tmp:
        args = dpo_args(
            tmp,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=4,
            learning_rate=1e-4,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            optim="adamw_torch",
            max_grad_norm=1.0,
            logging_steps=1,
            beta=0.1,
            loss_type=["sigmoid"],
            max_length=64,
        )
        trainer = SequentialDPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([sharegpt_to_conversational(r) for r in raw]),
            processing_class=tokenizer,
        )
        trainer.train()
        log_history = copy.deepcopy(trainer.state.log_history)
        for entry in log_history:
            for k in TIMING_KEYS:
                if k in entry:
                    entry[k] = None
        from safetensors.torch import save_file

        kept = {
            k: v.detach().clone().contiguous()
            for k, v in trainer.model.state_dict().items()
            if k.startswith(FULL_KEPT)
        }
        out.mkdir(parents=True, exist_ok=True)
        save_file(kept, str(out / "final_weights.safetensors"), metadata={"format": "pt"})
        captured = trainer.captured
    dump_json(out / "log_history.json", log_history)
    dump_json(out / "batches.json", {"setting": name, "micro_batches": captured})
    return {"log": log_history}


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    OUT.mkdir(parents=True, exist_ok=True)
    dump_json(OUT / "tokenize.json", tokenize_fixture(tokenizer))
    with tempfile.TemporaryDirectory() as tmp:
        # A fresh PEFT adapter (lora_B zero): the policy starts as the base, and TRL's reference
        # (a frozen copy of the initial adapter) equals the base with adapters disabled.
        fresh = Path(tmp) / "fresh"
        torch.manual_seed(42)
        save_adapter(get_peft_model(load_model(), LoraConfig(**LORA)), fresh)
        r = train_setting("sigmoid", tokenizer, fresh, "_fresh")
        print("sigmoid fresh", {k: r["log"][1][k] for k in ("loss", "rewards/margins")})
        # A trained-looking adapter (non-zero lora_B): the reference is the initial adapter,
        # so policy and reference differ from the first step on.
        init = Path(tmp) / "adapter_init"
        shutil.copytree(fresh, init)
        from safetensors.torch import load_file, save_file

        f = init / "adapter_model.safetensors"
        tensors = load_file(str(f))
        g = torch.Generator().manual_seed(7)
        for k in sorted(tensors):
            if "lora_B" in k:
                tensors[k] = torch.randn(tensors[k].shape, generator=g) * 0.02
        save_file(tensors, str(f), metadata={"format": "pt"})
        r = train_full(tokenizer)
        print("full", {k: r["log"][1][k] for k in ("loss", "rewards/margins")})
        for loss in LOSSES:
            r = train_setting(loss, tokenizer, init)
            first = r["log"][0]
            print(loss, {k: first[k] for k in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies")}, r["facts"])

if __name__ == "__main__":
    main()
