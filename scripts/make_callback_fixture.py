"""Records the order in which transformers' Trainer (via TRL's SFTTrainer) fires
TrainerCallback events, for tests/trainer_callbacks.rs.

Run: .venv/bin/python scripts/make_callback_fixture.py  (writes tests/fixtures/trainer/callback_order.json)
"""
import json
import os
import tempfile

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENTS = [
    "on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
    "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_evaluate",
    "on_prediction_step", "on_save", "on_log",
]


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []


def make_hook(name):
    def hook(self, args, state, control, **kwargs):
        self.events.append([name, state.global_step])
    return hook


for name in EVENTS:
    setattr(Recorder, name, make_hook(name))


def main():
    torch.manual_seed(0)
    model_dir = os.path.join(ROOT, "weights/tiny-glm")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = [f"[gMASK]<sop><|user|>\n{a}+{b}等于多少？<|assistant|>\n{a + b}" for a in range(3) for b in range(3)]
    train = Dataset.from_dict({"text": texts[:6]})
    evaluation = Dataset.from_dict({"text": texts[6:8]})
    recorder = Recorder()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=1, per_device_eval_batch_size=1,
            gradient_accumulation_steps=2, max_steps=3, logging_steps=1, eval_strategy="steps", eval_steps=2,
            save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, bf16=False,
            gradient_checkpointing=False, disable_tqdm=True, max_length=32, dataloader_num_workers=0,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer, callbacks=[recorder])
        trainer.train()
    config = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 2,
              "max_steps": 3, "logging_steps": 1, "eval_steps": 2, "save_steps": 2, "train_records": 6, "eval_records": 2}
    path = os.path.join(ROOT, "tests/fixtures/trainer/callback_order.json")
    with open(path, "w") as f:
        json.dump({"config": config, "events": recorder.events}, f, indent=1)
        f.write("\n")
    print(f"{len(recorder.events)} events -> {path}")


if __name__ == "__main__":
    main()
