#!/usr/bin/env python3
"""Reference fixtures for the 4-bit quantization of trl_like::quant, produced by bitsandbytes on the CPU.

Versions: bitsandbytes 0.50.2, torch 2.11 (scripts/requirements-ref.txt).

Writes tests/fixtures/quant/blockwise.safetensors. For every case
`{quant_type}_{nested|plain}_{fp32|bf16}_{shape}` it holds

  input.{fp32|bf16}.{shape}     the weight that was quantized ([out, in]), shared by the cases
  {case}.weight                 bitsandbytes.functional.quantize_4bit's packed uint8 codes
  {case}.weight.absmax, .quant_map, .nested_absmax, .nested_quant_map,
  {case}.weight.quant_state.bitsandbytes__{nf4|fp4}
                                QuantState.as_dict(packed=True): the keys transformers saves
  {case}.dequant                dequantize_4bit(packed, state) in the input dtype
  linear4bit.{bias,x,y,x_grad}  bnb.nn.Linear4bit(128 -> 16, nf4, nested, fp32 compute) on
                                input.fp32.16x128 in train mode: output and input gradient of
                                sum(y * arange(16))

And tests/fixtures/quant/tiny-glm-{nf4-nested,fp4}.safetensors (+ .quantization_config.json):
weights/tiny-glm as transformers saves it after loading with BitsAndBytesConfig(load_in_4bit=True,
fp32 compute): the quantized tensors only (the rest equals weights/tiny-glm), and the logits of a
left-padded batch (`inputs.*`).

Run from anywhere: `.venv/bin/python scripts/make_quant_fixtures.py` (a few seconds).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
import bitsandbytes.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "quant"


def weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    # An all-zero block (absmax 0: bitsandbytes clamps the divisor) and a block with one
    # large outlier (most values then round to the code book's centre).
    flat[64:128] = 0.0
    flat[128 + 7] = 0.5
    return w


def linear4bit(tensors: dict[str, torch.Tensor]) -> None:
    """`bnb.nn.Linear4bit` (nf4, nested, fp32 compute) forward and backward in train mode:
    the dequantize-and-GEMM path QLoRA training takes."""
    import bitsandbytes as bnb

    w = tensors["input.fp32.16x128"]
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(16, generator=g) * 0.1
    x = torch.randn(2, 3, 128, generator=g)
    lin = bnb.nn.Linear4bit(128, 16, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    lin = lin.to("cpu")  # quantizes
    lin.train()
    xg = x.clone().requires_grad_(True)
    y = lin(xg)
    (y * torch.arange(16.0)).sum().backward()
    tensors["linear4bit.bias"] = bias
    tensors["linear4bit.x"] = x
    tensors["linear4bit.y"] = y.detach()
    tensors["linear4bit.x_grad"] = xg.grad


def tiny_glm_4bit(quant_type: str, nested: bool) -> None:
    """weights/tiny-glm loaded by transformers with BitsAndBytesConfig(load_in_4bit, fp32
    compute): the 4-bit tensors save_pretrained writes, its quantization_config, and the
    logits of a left-padded batch. The unquantized tensors (embedding, norms, biases,
    lm_head) are saved unchanged, so the test takes them from weights/tiny-glm."""
    import json
    import tempfile

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=torch.float32,
    )
    src = ROOT / "weights" / "tiny-glm"
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=bnb, dtype=torch.float32, device_map="cpu"
    )
    # Train mode takes bitsandbytes' dequantize-and-GEMM path; in eval on CPUs with
    # AVX512-BF16 it switches to a bf16 kernel (inputs rounded to bf16) that no GPU or
    # training step uses. attention_dropout is 0, so train mode changes nothing else.
    model.train()
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 1900, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3] = 1900  # left padding with <|endoftext|>
    mask[1, :3] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    if nested:
        # Greedy tokens of `glm4 generate --load_in_4bit` (tests/qlora_load.rs).
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
        prompt = "我是ChatGLM，是"
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out_ids = model.generate(**enc, max_new_tokens=12, do_sample=False)
        (OUT / "tiny-glm-nf4-nested.generate.json").write_text(
            json.dumps(
                {
                    "prompt": prompt,
                    "input_ids": enc["input_ids"][0].tolist(),
                    "output_ids": out_ids[0].tolist(),
                },
                ensure_ascii=False,
            )
            + "\n"
        )
    dense = load_file(str(src / "model.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = load_file(str(Path(tmp) / "model.safetensors"))
        config = json.loads((Path(tmp) / "config.json").read_text())
    out = {}
    for key, value in saved.items():
        if key in dense and dense[key].dtype == value.dtype and dense[key].shape == value.shape:
            assert torch.equal(dense[key], value), key
        else:
            out[key] = value.contiguous()
    out["inputs.input_ids"] = ids
    out["inputs.attention_mask"] = mask
    out["inputs.logits"] = logits.contiguous()
    name = f"tiny-glm-{quant_type}{'-nested' if nested else ''}"
    save_file(out, str(OUT / f"{name}.safetensors"))
    (OUT / f"{name}.quantization_config.json").write_text(
        json.dumps(config["quantization_config"], indent=2, sort_keys=True) + "\n"
    )


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    # [16, 128]: 32 blocks, one partial nested block of 256; [33, 512]: 264 blocks, a full
    # and a partial nested block; [3, 70]: 210 values, a partial last block of 18.
    shapes = [(16, 128), (33, 512), (3, 70)]
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                for i, shape in enumerate(shapes):
                    case = f"{quant_type}_{'nested' if nested else 'plain'}_{dtype_name}_{shape[0]}x{shape[1]}"
                    w = weight(shape, seed=1000 + i).to(dtype)
                    packed, state = F.quantize_4bit(
                        w, blocksize=64, compress_statistics=nested, quant_type=quant_type
                    )
                    deq = F.dequantize_4bit(packed, state)
                    assert deq.dtype == dtype and tuple(deq.shape) == shape
                    tensors[f"input.{dtype_name}.{shape[0]}x{shape[1]}"] = w.contiguous()
                    tensors[f"{case}.weight"] = packed.contiguous()
                    for key, value in state.as_dict(packed=True).items():
                        tensors[f"{case}.weight.{key}"] = value.contiguous()
                    tensors[f"{case}.dequant"] = deq.contiguous()
    linear4bit(tensors)
    save_file(tensors, str(OUT / "blockwise.safetensors"))
    for quant_type, nested in (("nf4", True), ("fp4", False)):
        tiny_glm_4bit(quant_type, nested)
    print(f"wrote {len(tensors)} tensors to {OUT / 'blockwise.safetensors'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
