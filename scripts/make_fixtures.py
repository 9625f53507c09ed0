#!/usr/bin/env python3
"""Reference fixtures from Hugging Face transformers for the tiny GLM models.

Reads weights/tiny-glm and weights/tiny-glm4 (made by scripts/make_tiny_models.py) and
writes into tests/fixtures/:

  glm_logits.safetensors, glm4_logits.safetensors   forward-pass logits (left-padded batch)
  glm_generate.json, glm4_generate.json             greedy generation cases
  chat_template.json                                chat template renderings + token ids
  encode.json                                       tokenizer encode/decode cases

Notes on position ids in transformers 5.23 (checked against the installed sources):

* Plain forward (model(input_ids, attention_mask) with no position_ids):
  models/glm4/modeling_glm4.py:391-393 (and models/glm/modeling_glm.py:387-389) do
      past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
      position_ids = torch.arange(inputs_embeds.shape[1]) + past_seen_tokens
      position_ids = position_ids.unsqueeze(0)
  i.e. arange(L) shared by every row, IGNORING left padding. This script checks that
  by capturing the position_ids given to the rotary embedding and by comparing with an
  explicit position_ids=arange(L) run.

* generate(): generation/utils.py:2885-2888 calls _prepare_position_ids_for_generation
  when no position_ids are passed; generation/utils.py:905-908 computes
      position_ids = attention_mask.long().cumsum(-1) - 1
      position_ids = position_ids.masked_fill(attention_mask == 0, 0)
  so left pads get position 0 (NOT 1 as in transformers 4.x, which used masked_fill_(..., 1)),
  and the first real token gets position 0. During decoding,
  _update_model_kwargs_for_generation (generation/utils.py:1266-1276) appends
  position_ids[..., -1:] + 1 for every new token, and prepare_inputs_for_generation
  (generation/utils.py:707-712) slices the last `sequence_length` positions for the step.
  The pad positions' value does not matter because those keys are masked out.
  This script captures the prefill position ids during generate() and asserts they equal
  the cumsum formula; they are stored as `prefill_position_ids` in the generate JSON.

* Logits at left-pad positions are implementation defined (eager and sdpa disagree there by
  ~4.0 while agreeing to ~3e-6 elsewhere). The stored `logits` come from sdpa; compare only
  positions where attention_mask == 1.

Notes on chat templates in transformers 5.23 (utils/chat_template_utils.py):

* :664-666 the Jinja environment is ImmutableSandboxedEnvironment(trim_blocks=True,
  lstrip_blocks=True) with default (lenient) Undefined and no autoescape. trim_blocks drops the
  newline right after a block tag, so the GLM-4 tool header renders as "# 可用工具\n## name"
  (one newline, not two). An undefined item['metadata'] renders as "".
* :625-628 `tojson` is overridden with json.dumps(ensure_ascii=False, sort_keys=False): no
  HTML escaping, non-ASCII kept as is, key order preserved, indent=4 as requested.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights"
FIXTURES = ROOT / "tests" / "fixtures"
MODELS = {"glm": WEIGHTS / "tiny-glm", "glm4": WEIGHTS / "tiny-glm4"}

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
]

MIN_GAP = 1e-3


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def load_model(path: Path, attn: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    return model


class PositionCapture:
    """Records the position_ids passed to the model's rotary embedding."""

    def __init__(self, model):
        self.calls: list[torch.Tensor] = []
        self.handle = model.model.rotary_emb.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        self.calls.append(pos.detach().clone())

    def close(self):
        self.handle.remove()


# --------------------------------------------------------------------------------------
# 1. logits
# --------------------------------------------------------------------------------------
LOGIT_TEXTS = [
    ("我是一个人工智能助手，很高兴为你服务。今天北京天气很好。", 12),
    ("Hello, my name is ChatGLM. Nice to meet you.", 10),
    ("请帮我查一下上海明天的天气，谢谢！", 7),
]


def left_padded_batch(tok):
    rows = []
    for text, n in LOGIT_TEXTS:
        ids = tok(text).input_ids
        assert len(ids) >= n, (text, len(ids), n)
        rows.append(ids[:n])
    L = max(len(r) for r in rows)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows], dtype=torch.int64)
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], dtype=torch.int64)
    assert [int((mask[i] == 0).sum()) for i in range(3)] == [0, 2, 5]
    return input_ids, mask


@torch.no_grad()
def make_logits(name: str, tok) -> dict:
    model = load_model(MODELS[name], "sdpa")
    eager = load_model(MODELS[name], "eager")
    input_ids, mask = left_padded_batch(tok)
    L = input_ids.shape[1]

    cap = PositionCapture(model)
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    cap.close()
    assert len(cap.calls) == 1
    used_pos = cap.calls[0].to(torch.int64)
    assert torch.equal(used_pos, torch.arange(L).unsqueeze(0)), used_pos

    explicit = model(
        input_ids=input_ids, attention_mask=mask, position_ids=torch.arange(L).unsqueeze(0).expand(3, L)
    ).logits
    assert torch.equal(logits, explicit), "explicit arange position_ids changed the logits"

    real = mask.bool()
    eager_logits = eager(input_ids=input_ids, attention_mask=mask).logits
    diff = (eager_logits - logits)[real].abs().max().item()
    assert diff < 1e-4, f"eager vs sdpa differ by {diff}"
    assert torch.isfinite(logits).all(), "non-finite logits (pad positions?)"

    nopad = model(input_ids=input_ids[:1]).logits
    assert (nopad - logits[:1]).abs().max().item() < 1e-4

    out = {
        "input_ids": input_ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "position_ids": used_pos.contiguous(),
        "logits": logits.to(torch.float32).contiguous(),
        "logits_nopad": nopad.to(torch.float32).contiguous(),
    }
    save_file(out, str(FIXTURES / f"{name}_logits.safetensors"))
    return {"eager_vs_sdpa_max_abs_diff": diff, "L": L}


# --------------------------------------------------------------------------------------
# 2. generation
# --------------------------------------------------------------------------------------
EOS_PROMPTS = {"glm": "告诉我1+7等于多少？1+7等于8。", "glm4": "What is 7 + 4? 7 + 4 = 11."}


def gen_cases(tok, name: str):
    cases = []
    ids = tok.encode("我是ChatGLM，是")
    cases.append(("single_unpadded", [ids], [[1] * len(ids)], 12))

    chats = [
        [{"role": "user", "content": "你好，告诉我你的名字。"}],
        [{"role": "user", "content": "告诉我1+2等于多少？"}],
    ]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tok(texts, add_special_tokens=False, padding=True, padding_side="left")
    # Same thing through apply_chat_template(tokenize=True), as the tutorial's callback does it.
    enc2 = tok.apply_chat_template(
        chats, tokenize=True, add_generation_prompt=True, padding=True, padding_side="left", return_dict=True
    )
    assert enc2["input_ids"] == enc["input_ids"] and enc2["attention_mask"] == enc["attention_mask"]
    cases.append(("chat_batch_left_padded", enc["input_ids"], enc["attention_mask"], 12))

    ids = tok("Hello").input_ids
    cases.append(("hello_with_special", [ids], [[1] * len(ids)], 20))

    # Extra case (not in the tutorial): with the chosen seeds the first prompt makes the tiny
    # model emit an EOS id well before max_new_tokens (glm: <|endoftext|> at step 8, glm4:
    # <|observation|> at step 7), while the second row keeps going, so the output exercises
    # "finished rows are filled with pad_token_id". The prompts were found by scanning the
    # corpus lines of make_tiny_models.py for an early EOS with a large top-2 gap;
    # make_generate() asserts that the EOS really occurs.
    chats = [
        [{"role": "user", "content": EOS_PROMPTS[name]}],
        [{"role": "user", "content": "你好，告诉我你的名字。"}],
    ]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tok(texts, add_special_tokens=False, padding=True, padding_side="left")
    cases.append(("chat_batch_eos_stop", enc["input_ids"], enc["attention_mask"], 12))
    return cases


@torch.no_grad()
def make_generate(name: str, tok) -> list[float]:
    model = load_model(MODELS[name], "sdpa")
    gc = model.generation_config
    eos = set(gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id])
    out_cases = []
    gaps = []
    for case_name, input_ids, attention_mask, max_new in gen_cases(tok, name):
        ii = torch.tensor(input_ids, dtype=torch.int64)
        am = torch.tensor(attention_mask, dtype=torch.int64)
        cap = PositionCapture(model)
        res = model.generate(
            input_ids=ii,
            attention_mask=am,
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=gc.eos_token_id,
            pad_token_id=gc.pad_token_id,
            use_cache=True,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
        cap.close()
        prefill_pos = cap.calls[0].to(torch.int64)
        expect = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        assert torch.equal(prefill_pos.expand_as(expect), expect), (prefill_pos, expect)
        # Decode steps: one position per row, continuing from the last prompt position.
        for step, pos in enumerate(cap.calls[1:], start=1):
            assert torch.equal(pos.to(torch.int64).view(-1), expect[:, -1] + step), (step, pos)

        seqs = res.sequences
        P = ii.shape[1]
        finished = torch.zeros(ii.shape[0], dtype=torch.bool)
        min_gap = float("inf")
        for step, (scores, raw) in enumerate(zip(res.scores, res.logits)):
            assert torch.equal(scores, raw), "greedy scores should be the raw logits"
            top2 = scores.topk(2, dim=-1).values
            for r in range(scores.shape[0]):
                if finished[r]:
                    continue
                min_gap = min(min_gap, (top2[r, 0] - top2[r, 1]).item())
                assert int(seqs[r, P + step]) == int(scores[r].argmax())
                if int(seqs[r, P + step]) in eos:
                    finished[r] = True
        assert min_gap > MIN_GAP, f"{name}/{case_name}: min top-2 gap {min_gap} too small; change the seed"
        gaps.append(min_gap)
        # After a row's EOS, generate() fills the rest of that row with pad_token_id.
        for r in range(seqs.shape[0]):
            new_tokens = seqs[r, P:].tolist()
            hit = [i for i, t in enumerate(new_tokens) if t in eos]
            if hit:
                assert all(t == gc.pad_token_id for t in new_tokens[hit[0] + 1 :]), new_tokens
        if case_name == "chat_batch_eos_stop":
            assert bool(finished[0]) and not bool(finished[1]), "expected row 0 (only) to stop at EOS"

        # Cross-check: each row of a padded batch gives the same tokens as the row on its own.
        if ii.shape[0] > 1:
            for r in range(ii.shape[0]):
                real = ii[r][am[r].bool()].unsqueeze(0)
                solo = model.generate(
                    input_ids=real,
                    attention_mask=torch.ones_like(real),
                    do_sample=False,
                    max_new_tokens=max_new,
                    eos_token_id=gc.eos_token_id,
                    pad_token_id=gc.pad_token_id,
                )
                new_b = seqs[r, P:].tolist()
                new_s = solo[0, real.shape[1] :].tolist()
                assert new_b[: len(new_s)] == new_s, (name, case_name, r, new_b, new_s)

        out_cases.append(
            {
                "name": case_name,
                "input_ids": ii.tolist(),
                "attention_mask": am.tolist(),
                "max_new_tokens": max_new,
                "output_ids": seqs.tolist(),
                "min_top2_gap": min_gap,
                "prefill_position_ids": expect.tolist(),
                "decoded": tok.batch_decode(seqs, skip_special_tokens=False),
            }
        )
    write_json(FIXTURES / f"{name}_generate.json", {"cases": out_cases})
    return gaps


# --------------------------------------------------------------------------------------
# 3. chat template
# --------------------------------------------------------------------------------------
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_today_weather",
        "description": "获取今天的天气",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市名"}},
            "required": ["city"],
        },
    },
}

HTML_TOOL = {
    "type": "function",
    "function": {
        "name": "echo",
        "description": "Returns <b>\"text\"</b> & 'more' — 原样返回",
        "parameters": {"type": "object", "properties": {}, "required": []},
    },
}

CHAT_CASES = [
    {
        "name": "alpaca",
        "messages": [
            {"role": "user", "content": "请把下面的句子翻译成英文。\n\n今天天气很好，我们去公园散步吧。"},
            {"role": "assistant", "content": "The weather is nice today, let's take a walk in the park."},
        ],
        "tools": None,
        "add_generation_prompt": False,
    },
    {
        "name": "user_only_generation_prompt",
        "messages": [{"role": "user", "content": "你好，告诉我你的名字。"}],
        "tools": None,
        "add_generation_prompt": True,
    },
    {
        "name": "system_multi_turn",
        "messages": [
            {"role": "system", "content": "你是一个友好的助手。"},
            {"role": "user", "content": "1+2等于多少？"},
            {"role": "assistant", "content": "1+2等于3。"},
            {"role": "user", "content": "那再加4呢？"},
            {"role": "assistant", "content": "3+4等于7。"},
        ],
        "tools": None,
        "add_generation_prompt": False,
    },
    {
        "name": "tool_call",
        "messages": [
            {"role": "system", "content": "", "tools": [WEATHER_TOOL]},
            {"role": "user", "content": "北京今天天气怎么样？"},
            {
                "role": "assistant",
                "metadata": "get_today_weather",
                "content": '{"name": "get_today_weather", "arguments": {"city": "北京"}}',
            },
            {"role": "observation", "content": '{"city": "北京", "weather": "晴", "temperature": "25度"}'},
            {"role": "assistant", "content": "北京今天是晴天，气温25度。"},
        ],
        "tools": None,
        "add_generation_prompt": False,
    },
    {
        "name": "html_and_unicode",
        "messages": [
            {"role": "user", "content": "Is 1 < 2 && 3 > 2? Say \"yes\" & 'no' — 你好，世界 🙂"},
            {"role": "assistant", "content": "<b>yes</b> &amp; 'ok' \"done\" 完成"},
        ],
        "tools": None,
        "add_generation_prompt": True,
    },
    {
        "name": "tool_json_escaping",
        "messages": [
            {"role": "system", "content": "", "tools": [HTML_TOOL]},
            {"role": "user", "content": "echo <hi>"},
        ],
        "tools": None,
        "add_generation_prompt": True,
    },
    {
        "name": "tools_argument_ignored",
        "messages": [{"role": "user", "content": "北京今天天气怎么样？"}],
        "tools": [WEATHER_TOOL],
        "add_generation_prompt": True,
    },
]


def make_chat_template(tok) -> list[dict]:
    out = []
    for case in CHAT_CASES:
        text = tok.apply_chat_template(
            case["messages"],
            tools=case["tools"],
            tokenize=False,
            add_generation_prompt=case["add_generation_prompt"],
        )
        ids = tok(text, add_special_tokens=False).input_ids
        out.append({**case, "text": text, "input_ids": ids})
    write_json(FIXTURES / "chat_template.json", {"cases": out})
    return out


# --------------------------------------------------------------------------------------
# 4. encode / decode
# --------------------------------------------------------------------------------------
ENCODE_TEXTS = [
    "我是一个人工智能助手",
    "Hello, world! It's a test: we'll see.",
    "中文和English混合，GLM-4模型有9B参数。",
    "今天心情很好🙂👍🎉",
    "a   b\t\tc    end  ",
    "line1\n\nline2\r\n  indented\n",
    "before <|user|> middle [gMASK]<sop> after",
    "12345678 + 3.14159 = ?",
    "",
]


def make_encode(tok) -> dict:
    cases = []
    for text in ENCODE_TEXTS:
        with_sp = tok(text).input_ids
        no_sp = tok(text, add_special_tokens=False).input_ids
        cases.append(
            {
                "text": text,
                "ids_with_special": with_sp,
                "ids_no_special": no_sp,
                "decoded": tok.decode(with_sp, skip_special_tokens=False),
                "decoded_skip": tok.decode(with_sp, skip_special_tokens=True),
            }
        )
    obj = {
        "special_tokens": {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "vocab_size": len(tok),
        "cases": cases,
    }
    write_json(FIXTURES / "encode.json", obj)
    return obj


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(MODELS["glm"])
    tok4 = AutoTokenizer.from_pretrained(MODELS["glm4"])
    assert tok.get_vocab() == tok4.get_vocab()

    enc = make_encode(tok)
    print("special tokens:", enc["special_tokens"], "vocab:", enc["vocab_size"])
    make_chat_template(tok)
    for name in MODELS:
        info = make_logits(name, tok)
        gaps = make_generate(name, tok)
        print(f"{name}: logits L={info['L']} eager/sdpa diff={info['eager_vs_sdpa_max_abs_diff']:.2e}; "
              f"min_top2_gap per case={['%.4f' % g for g in gaps]}")
    for f in sorted(FIXTURES.iterdir()):
        print(f"  {f.relative_to(ROOT)}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    sys.exit(main())
