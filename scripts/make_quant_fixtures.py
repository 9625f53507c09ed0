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
    print(f"wrote {len(tensors)} tensors to {OUT / 'blockwise.safetensors'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
