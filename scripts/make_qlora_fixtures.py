#!/usr/bin/env python3
"""QLoRA training reference: TRL SFTTrainer + PEFT on a 4-bit tiny GLM, by bitsandbytes 0.50.2.

Same mechanism as scripts/make_trainer_fixtures.py (imported from it): no shuffling, every
micro-batch recorded, the initial adapter of tests/fixtures/trainer/b4/adapter_init, batch 4,
4 steps, lr 5e-4, fp32 on the CPU. The base is weights/tiny-glm loaded by transformers with
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=float32, ...), as TRL's
get_quantization_config builds it.

Writes tests/fixtures/trainer/qlora_{nf4_nested,fp4}/: log_history.json, batches.json,
adapter_final/, and greedy.json (greedy tokens of PEFT's trained adapter on the 4-bit base).

Run from anywhere: `.venv/bin/python scripts/make_qlora_fixtures.py` (about a minute).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_trainer_fixtures as mtf  # noqa: E402  (chdirs to the repository root)

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

VARIANTS = {"qlora_nf4_nested": ("nf4", True), "qlora_fp4": ("fp4", False)}


def load_4bit(quant_type: str, nested: bool):
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        mtf.MODEL_DIR, quantization_config=bnb, dtype=torch.float32, device_map="cpu"
    )


def train(name: str, quant_type: str, nested: bool, tokenizer) -> None:
    out = mtf.OUT / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    init = mtf.OUT / "b4" / "adapter_init"
    torch.manual_seed(42)
    model = PeftModel.from_pretrained(load_4bit(quant_type, nested), str(init), is_trainable=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = mtf.base_args(
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
            **mtf.SETTINGS["b4"],
        )
        trainer = mtf.SequentialSFTTrainer(
            model=model,
            args=args,
            train_dataset=mtf.alpaca16(tokenizer),
            processing_class=tokenizer,
            formatting_func=mtf.alpaca_formatting_func(tokenizer),
        )
        trainer.train()
        log_history = copy.deepcopy(trainer.state.log_history)
        for entry in log_history:
            for k in mtf.TIMING_KEYS:
                if k in entry:
                    entry[k] = None
        mtf.save_adapter(trainer.model, out / "adapter_final")
        captured = trainer.captured
    mtf.compact_json(out / "log_history.json", log_history)
    mtf.compact_json(
        out / "batches.json",
        {"setting": name, "quant_type": quant_type, "nested": nested, **mtf.SETTINGS["b4"], "micro_batches": captured},
    )
    print(name, [round(e["loss"], 6) for e in log_history if "loss" in e and "train_loss" not in e])

    # The trained adapter on a freshly loaded 4-bit base (train mode: bitsandbytes'
    # dequantize-and-GEMM path, see make_quant_fixtures.py), greedy.
    peft_model = PeftModel.from_pretrained(load_4bit(quant_type, nested), str(out / "adapter_final"))
    peft_model.train()
    prompt = "我是ChatGLM，是"
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = peft_model.generate(**enc, max_new_tokens=12, do_sample=False)
    (out / "greedy.json").write_text(
        json.dumps(
            {"prompt": prompt, "input_ids": enc["input_ids"][0].tolist(), "output_ids": ids[0].tolist()},
            ensure_ascii=False,
        )
        + "\n"
    )


def main() -> None:
    tokenizer = mtf.load_tokenizer()
    for name, (quant_type, nested) in VARIANTS.items():
        train(name, quant_type, nested, tokenizer)


if __name__ == "__main__":
    main()
