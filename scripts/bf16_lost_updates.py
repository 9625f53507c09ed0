"""How many AdamW updates pure bf16 training loses (docs/DISTRIBUTED.md).

Full fine-tuning of weights/tiny-glm in bf16 on random tokens, at the
tutorial's full fine-tuning rate 5e-5: torch's AdamW on the bf16 parameters
(what transformers does without DeepSpeed) against AdamW on fp32 master copies
whose values are cast back to bf16 after each step (DeepSpeed's bf16
optimizer, `glm4 sft --deepspeed`). Prints, after 1 and after 10 steps, the
share of weights whose bf16 value changed and the share of nonzero fp32
updates of the first step that pure bf16 dropped.
"""

import torch
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
LR, STEPS = 5e-5, 10


def load():
    return AutoModelForCausalLM.from_pretrained("weights/tiny-glm", dtype=torch.bfloat16)


pure, mixed = load(), load()
start = {n: p.detach().clone() for n, p in pure.named_parameters()}
masters = [p.detach().float().clone().requires_grad_(True) for p in mixed.parameters()]
opt_pure = torch.optim.AdamW(pure.parameters(), lr=LR, weight_decay=0.0)
opt_mixed = torch.optim.AdamW(masters, lr=LR, weight_decay=0.0)
batches = [torch.randint(0, pure.config.vocab_size, (4, 64)) for _ in range(STEPS)]


def changed(model):
    same = total = 0
    for n, p in model.named_parameters():
        same += (p.detach() == start[n]).sum().item()
        total += p.numel()
    return 1 - same / total


for step, ids in enumerate(batches, 1):
    for model in (pure, mixed):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
    for m, p in zip(masters, mixed.parameters()):
        m.grad = p.grad.float()
    before = [m.detach().clone() for m in masters]
    opt_pure.step()
    opt_mixed.step()
    with torch.no_grad():
        for m, p in zip(masters, mixed.parameters()):
            p.copy_(m)
    if step == 1:
        moved = dropped = 0
        for (n, p), m, b in zip(pure.named_parameters(), masters, before):
            upd = m.detach() != b
            moved += upd.sum().item()
            dropped += (upd & (p.detach() == start[n])).sum().item()
        print(f"step 1: pure bf16 dropped {dropped / moved:.1%} of the {moved} nonzero updates")
    if step in (1, STEPS):
        print(
            f"after {step} step(s): bf16 weights changed: pure bf16 {changed(pure):.1%}, "
            f"fp32 masters {changed(mixed):.1%}"
        )
