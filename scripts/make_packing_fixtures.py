#!/usr/bin/env python3
"""Reference fixtures for padding-free and packed training, produced by real TRL / transformers / PEFT.

Versions: trl 1.16.0, transformers 5.23.0, peft 0.21.2, torch 2.11 (scripts/requirements-ref.txt).
Same model, data, LoRA and optimizer settings as scripts/make_trainer_fixtures.py (whose helpers
this script imports); CPU, fp32, no dropout, no shuffling: two runs write byte-identical files.

Writes tests/fixtures/trainer/:

  packing.json        trl.pack_dataset on small made-up datasets (sequences of given lengths holding
                      consecutive ids 1, 2, 3, ...; label = -id, or -100 when id % 3 == 0): bfd,
                      bfd_split and wrapped at several seq_lengths, and 1,010 short sequences (more
                      than one `Dataset.map` batch); plus DataCollatorForLanguageModeling(padding_free=True)
                      outputs
  pf_b4/ pf_b2_ga2/   4 optimizer steps with padding_free=True (no packing): batch 4, and batch 2
                      with 2 accumulation steps
  pack_bfd_b2/        4 optimizer steps with packing=True (bfd, max_length 64), batch 2
      records.json         the tokenized sequences given to SFTTrainer (TRL's own preparation of
                           the alpaca records, unpacked and untruncated)
      packed_dataset.json  (pack_bfd_b2 only) trainer.train_dataset after packing
      adapter_init/ adapter_final/ log_history.json batches.json   as for b4 (batches.json holds
                           position_ids instead of an attention_mask: padding-free batches have none)

Run from anywhere: `.venv/bin/python scripts/make_packing_fixtures.py` (about 30 s on 2 cores).
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_trainer_fixtures as mtf  # noqa: E402  (also chdirs to the repository root)

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402
from trl import pack_dataset  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

OUT = mtf.OUT


# ---------------------------------------------------------------------------------------------
# (a) pack_dataset on its own
# ---------------------------------------------------------------------------------------------


def label_of(token_id: int) -> int:
    # Labels differ from the ids (negated, -100 on every third id) so a mix-up of the two columns shows.
    return -100 if token_id % 3 == 0 else -token_id


def pack_case(name, lengths, seq_length, strategy):
    """Sequences of the given lengths holding consecutive ids 1, 2, 3, ... (the tests rebuild them)."""
    ids = iter(range(1, 10**7))
    input_ids = [[next(ids) for _ in range(n)] for n in lengths]
    labels = [[label_of(x) for x in seq] for seq in input_ids]
    packed = pack_dataset(Dataset.from_dict({"input_ids": input_ids, "labels": labels}), seq_length, strategy).to_dict()
    # Packing moves both columns together: each label still belongs to its id.
    assert all([label_of(x) for x in a] == b for a, b in zip(packed["input_ids"], packed["labels"]))
    out = {"name": name, "strategy": strategy, "seq_length": seq_length, "lengths": lengths,
           "packed_input_ids": packed["input_ids"]}
    if "seq_lengths" in packed:
        out["packed_seq_lengths"] = packed["seq_lengths"]
    return out


def make_packing_cases() -> dict:
    # TRL's docstring example (data_utils.py), then lengths that exercise the best fit: ties, exact
    # fits, sequences longer than the block, an empty sequence (dropped by bfd).
    doc = [5, 2, 3, 1]
    mixed = [7, 3, 5, 5, 2, 9, 1, 4, 4, 6, 12, 3, 0, 8, 2, 5]
    rng = random.Random(6)
    many = [rng.randint(1, 6) for _ in range(1010)]
    cases = []
    for strategy in ("bfd", "bfd_split", "wrapped"):
        cases.append(pack_case("docstring", doc, 4, strategy))
        for seq_length in (8, 10, 16):
            cases.append(pack_case(f"mixed_{seq_length}", mixed, seq_length, strategy))
    # More than 1,000 sequences: `Dataset.map(batched=True)` packs each batch of 1,000 on its own.
    for strategy in ("bfd", "bfd_split", "wrapped"):
        cases.append(pack_case("many_1010", many, 16, strategy))

    # The collator's position_ids and first-token labels for packed and plain examples.
    examples = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "seq_lengths": [3, 2]},
        {"input_ids": [6, 7, 8], "labels": [-100, 7, 8], "seq_lengths": [3]},
    ]
    plain = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    collated = []
    for exs, mult in ((examples, None), (plain, None), (plain, 4)):
        c = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=mult)(exs)
        collated.append(
            {
                "examples": exs,
                "pad_to_multiple_of": mult,
                "keys": sorted(c.keys()),
                "input_ids": c["input_ids"].tolist(),
                "position_ids": c["position_ids"].tolist(),
                "labels": c["labels"].tolist(),
                "cu_seq_lens": c["cu_seq_lens_q"].tolist(),
            }
        )
    return {"trl_version": trl.__version__, "cases": cases, "collator": collated}


# ---------------------------------------------------------------------------------------------
# (b) training steps
# ---------------------------------------------------------------------------------------------

SETTINGS = {
    "pf_b4": dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, padding_free=True, max_length=None),
    "pf_b2_ga2": dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, padding_free=True, max_length=None),
    "pack_bfd_b2": dict(
        per_device_train_batch_size=2, gradient_accumulation_steps=1, packing=True, packing_strategy="bfd",
        max_length=64,
    ),
}
RECORDS = {"pf_b4": 16, "pf_b2_ga2": 16, "pack_bfd_b2": 24}


class RecordingSFTTrainer(mtf.SequentialSFTTrainer):
    """Records position_ids (padding-free batches have no attention_mask)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rec = {
            "step": self.state.global_step + 1,
            "input_ids": inputs["input_ids"].tolist(),
            "position_ids": inputs["position_ids"].tolist() if "position_ids" in inputs else None,
            "labels": inputs["labels"].tolist(),
            "num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch),
            "keys": sorted(inputs.keys()),
        }
        loss = mtf.SFTTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        rec["loss"] = float((loss[0] if isinstance(loss, tuple) else loss).detach())
        if model.training:
            m = self._metrics["train"]
            rec["entropy"] = m["entropy"][-1]
            rec["mean_token_accuracy"] = m["mean_token_accuracy"][-1]
            rec["num_tokens_total"] = m["num_tokens"][-1]
            self.captured.append(rec)
        return loss


def trl_tokenized_alpaca(tokenizer, n) -> list[dict]:
    """TRL's own preparation of the first n alpaca records (formatting_func, eos, tokenize), untruncated."""
    model = mtf.load_model()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = mtf.SFTTrainer(
            model=model,
            args=mtf.base_args(tmp, max_length=None),
            train_dataset=Dataset.from_list(mtf.read_json(mtf.ALPACA)[:n]),
            processing_class=tokenizer,
            formatting_func=mtf.alpaca_formatting_func(tokenizer),
        )
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]


def packed_window_nll(model, micro_batches) -> float:
    """Token-mean NLL of each sequence run on its own (plain HF forward) over one step's micro-batches."""
    total, count = 0.0, 0
    with torch.no_grad():
        for mb in micro_batches:
            ids = torch.tensor(mb["input_ids"][0])
            pos = torch.tensor(mb["position_ids"][0])
            labels = torch.tensor(mb["labels"][0])
            starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
            for s, e in zip(starts[:-1], starts[1:]):
                logits = model(input_ids=ids[None, s:e]).logits.float()[0]
                lab = labels[s + 1 : e]
                total += torch.nn.functional.cross_entropy(logits[:-1], lab, ignore_index=-100, reduction="sum").item()
                count += int((lab != -100).sum())
    return total / count


def train_setting(name, tokenizer, init_dir, records) -> dict:
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(init_dir, out / "adapter_init")
    mtf.compact_json(out / "records.json", records)

    torch.manual_seed(42)
    base = mtf.load_model()
    model = PeftModel.from_pretrained(base, str(out / "adapter_init"), is_trainable=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = mtf.base_args(
            tmp, max_steps=4, learning_rate=5e-4, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            optim="adamw_torch", max_grad_norm=1.0, logging_steps=1, **SETTINGS[name],
        )
        trainer = RecordingSFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
        )
        assert trainer.padding_free, "the collator must be padding-free"
        packed = None
        if SETTINGS[name].get("packing"):
            packed = [
                {"input_ids": r["input_ids"], "labels": r["labels"], "seq_lengths": r["seq_lengths"]}
                for r in trainer.train_dataset
            ]
        trainer.train()
        log_history = copy.deepcopy(trainer.state.log_history)
        for entry in log_history:
            for k in mtf.TIMING_KEYS:
                if k in entry:
                    entry[k] = None
        mtf.save_adapter(trainer.model, out / "adapter_final")
        captured = trainer.captured

    # Padding-free batches: one row, no attention_mask, position_ids restarting at 0 per sequence, and the
    # first label of every sequence ignored.
    for mb in captured:
        assert len(mb["input_ids"]) == 1 and "attention_mask" not in mb["keys"], mb["keys"]
        for p, l in zip(mb["position_ids"][0], mb["labels"][0]):
            assert p != 0 or l == -100
    # The first logged loss is the base model's loss over the step's sequences, each run alone: attention did
    # not cross sequence boundaries in TRL's run.
    first = [mb for mb in captured if mb["step"] == 1]
    ref = packed_window_nll(mtf.base_reference(), first)
    logged = [e for e in log_history if "loss" in e and "train_loss" not in e]
    assert abs(logged[0]["loss"] - ref) < 1e-5, (logged[0]["loss"], ref)

    mtf.compact_json(out / "log_history.json", log_history)
    settings = {k: v for k, v in SETTINGS[name].items()}
    mtf.compact_json(out / "batches.json", {"setting": name, **settings, "micro_batches": captured})
    if packed is not None:
        mtf.compact_json(out / "packed_dataset.json", packed)
    return {"log": logged, "train": [e for e in log_history if "train_loss" in e][0], "ref": ref}


README_MARK = "## Padding-free and packing (scripts/make_packing_fixtures.py)"

README = """\
{mark}

Written by `scripts/make_packing_fixtures.py` after `make_trainer_fixtures.py` (which rewrites the
sections above; this one is appended to them). Same model, LoRA, optimizer, schedule and seed as
b4; CPU, fp32, no shuffling.

* `packing.json`: `trl.pack_dataset(Dataset.from_dict({{"input_ids", "labels"}}), seq_length,
  strategy)` (trl/data_utils.py) on sequences of the listed `lengths` holding consecutive ids
  1, 2, 3, ... (label = -id, or -100 where id % 3 == 0). bfd sorts by length, longest first (a
  stable sort: ties keep dataset order), and puts each sequence into the open block with the least
  room that still fits it (a segment tree over free space; among blocks with the same free space
  the one that got it first), else opens a block; sequences longer than the block are cut
  (`bfd`) or split into block-sized pieces, the last one shorter (`bfd_split`); empty ones are
  dropped. `wrapped` concatenates and cuts. `Dataset.map(batched=True)` hands `pack_dataset`
  1,000 examples at a time, so `many_1010` packs its first 1,000 sequences and the last 10 apart.
  `collator`: `DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)` on packed and
  plain examples: one row, `position_ids` restarting at 0 for every sequence
  (`get_position_ids_from_packed_seq_lengths`), the label at every position 0 set to -100
  (sft_trainer.py:208), `pad_to_multiple_of` padding with position 0 (each pad its own sequence
  in `cu_seq_lens`), no `attention_mask`.
* `pf_b4/`, `pf_b2_ga2/`: `padding_free=True` without packing, batch 4 and batch 2 x accumulation
  2. TRL refuses padding_free without packing while `max_length` is set ("max_length is not
  enforced", sft_trainer.py:999-1004), so these run with `max_length=None` on `records.json`: TRL's
  own tokenization of the first 16 demo_alpaca.json records (tutorial formatting_func, eos,
  `[gMASK]<sop>` twice), none longer than 64, given to SFTTrainer pre-tokenized.
* `pack_bfd_b2/`: `packing=True`, `packing_strategy="bfd"`, `max_length=64`, batch 2, on the first
  24 records tokenized the same way (one is 66 tokens long and is cut to 64).
  `packed_dataset.json` is `trainer.train_dataset` (input_ids, labels, seq_lengths). bfd packing
  implies the padding-free collator (sft_trainer.py:916).
* `batches.json`: every micro-batch as `compute_loss` received it: `input_ids`, `position_ids`,
  `labels` (`[1, total]`), `num_items_in_batch`, `keys` (no attention_mask), the micro-batch loss
  and metrics. Without an attention mask transformers builds the attention mask from the packed
  `position_ids` (block-diagonal, causal in each block); the script checks that the first logged
  loss equals the base model's loss over the step's sequences each run alone.
* Logged `num_tokens` counts every slot of the padding-free row (`position_ids.size(1)`,
  sft_trainer.py:1649-1653). `num_items_in_batch` counts `labels[..., 1:] != -100` over the
  window, so the first token of every sequence is excluded from the loss normalisation as well.

| setting | logged loss, steps 1-4 | grad_norm (pre-clip), steps 1-4 | train_loss |
|---|---|---|---|
{table}
"""


def write_readme(results) -> None:
    path = OUT / "README.md"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if README_MARK in text:
        text = text[: text.index(README_MARK)]
    rows = []
    for name, r in results.items():
        losses = ", ".join(f"{e['loss']:.6f}" for e in r["log"])
        norms = ", ".join(f"{e['grad_norm']:.6f}" for e in r["log"])
        rows.append(f"| {name} | {losses} | {norms} | {r['train']['train_loss']:.6f} |")
    text = text.rstrip("\n") + "\n\n" + README.format(mark=README_MARK, table="\n".join(rows))
    path.write_text(text, encoding="utf-8")


def main() -> None:
    torch.manual_seed(0)
    tokenizer = mtf.load_tokenizer()
    print(f"trl {trl.__version__}")
    mtf.compact_json(OUT / "packing.json", make_packing_cases())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        init_dir = Path(tmp) / "adapter_init"
        mtf.make_init_adapter(init_dir)
        for name in SETTINGS:
            records = trl_tokenized_alpaca(tokenizer, RECORDS[name])
            r = results[name] = train_setting(name, tokenizer, init_dir, records)
            print(name, "lengths", [len(x["input_ids"]) for x in records], "ref", r["ref"])
            for e in r["log"]:
                print("  ", {k: e[k] for k in ("loss", "grad_norm", "learning_rate", "entropy", "num_tokens", "epoch")})
            print("  ", r["train"])
    write_readme(results)
    print("done")


if __name__ == "__main__":
    sys.exit(main())
