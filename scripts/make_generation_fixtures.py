"""Greedy generation with logits processors (repetition penalty) from transformers,
for tests/model_parity.rs. Sampling is random, so only the deterministic
processors are pinned here; top-k / top-p are checked on fixed score vectors.

Run: .venv/bin/python scripts/make_generation_fixtures.py
"""
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper, TemperatureLogitsWarper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finite_or_none(t):
    # JSON has no -Infinity: filtered-out scores are written as null.
    return [[None if v == float("-inf") else v for v in row] for row in t.tolist()]


def main():
    model_dir = os.path.join(ROOT, "weights/tiny-glm")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cases = []
    for prompt, penalty in [("你好", 1.3), ("1+2等于", 1.2), ("Hello", 0.8)]:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=16, do_sample=False, repetition_penalty=penalty)
        cases.append({"prompt_ids": ids[0].tolist(), "repetition_penalty": penalty, "max_new_tokens": 16,
                      "output_ids": out[0].tolist()})
    torch.manual_seed(0)
    scores = torch.randn(2, 50)
    warped = {}
    for name, proc in [("temperature_0.6", TemperatureLogitsWarper(0.6)), ("top_k_5", TopKLogitsWarper(5)),
                       ("top_p_0.8", TopPLogitsWarper(0.8))]:
        warped[name] = finite_or_none(proc(None, scores.clone()))
    # The chat default chain: temperature 0.6, top_k 50 (a no-op at 50 tokens here), top_p 0.8.
    chain = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(50)(None, TemperatureLogitsWarper(0.6)(None, scores.clone())))
    warped["chat_chain"] = finite_or_none(chain)
    path = os.path.join(ROOT, "tests/fixtures/generation_processors.json")
    with open(path, "w") as f:
        json.dump({"greedy_with_penalty": cases, "scores": scores.tolist(), "warped": warped}, f)
        f.write("\n")
    print(path)


if __name__ == "__main__":
    main()
