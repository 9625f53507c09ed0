#!/usr/bin/env python3
"""Create two tiny, randomly initialised GLM-4-style checkpoints plus a shared tokenizer.

Outputs (relative to the repository root):
  weights/tiny-glm/   model_type "glm"  (GlmForCausalLM)
  weights/tiny-glm4/  model_type "glm4" (Glm4ForCausalLM)

Each directory holds config.json, generation_config.json, model.safetensors (fp32),
tokenizer.json and tokenizer_config.json.

Everything is generated locally (no Hub access): the tokenizer is a byte-level BPE
trained here on a small corpus written inline below, with the GLM-4 special tokens
appended at the end of the vocabulary in the same order as the real GLM-4 tokenizer.

The script is deterministic: running it twice produces byte-identical files.

Weight seeds: GLM_SEED = 3 / GLM4_SEED = 36 below. They were picked from seeds 1..40
as the ones giving the largest smallest top-1/top-2 logit gap over all greedy decoding
steps of the fixture prompts in scripts/make_fixtures.py (about 0.013 and 0.028; that
script asserts > 1e-3). Changing the corpus, the tokenizer or the init changes the gaps:
re-check them if you edit this file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    Glm4Config,
    Glm4ForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights"
TEMPLATE_PATH = ROOT / "src" / "glm4_chat_template.jinja"

GLM_SEED = 3
GLM4_SEED = 36

BPE_VOCAB_SIZE = 1900  # trained vocabulary, 256-byte alphabet included
MODEL_VOCAB_SIZE = 2048  # embedding rows (>= tokenizer size)

# Same order as the real GLM-4 tokenizer (ids 151329.. in THUDM/glm-4-9b).
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

# Pre-tokenisation regex of the real GLM-4 tokenizer.
GLM4_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# --------------------------------------------------------------------------------------
# Training corpus (hand written; arithmetic lines are generated further below)
# --------------------------------------------------------------------------------------
CORPUS_TEXT = """\
我是一个人工智能助手，很高兴为你服务。
我是ChatGLM，是一个由智谱AI训练的语言模型。
你好，我是一个名为 ChatGLM 的人工智能助手。
你好！有什么可以帮你的吗？
您好，请问有什么需要帮助的？
告诉我你的名字。
你好，告诉我你的名字。
我的名字是小智，我是一个人工智能助手。
我是一个乐于助人的助手，可以回答问题、写作和翻译。
很高兴认识你！
谢谢你的帮助。
不客气，随时为你效劳。
早上好！今天过得怎么样？
晚上好，祝你有个好梦。
再见，欢迎下次再来。
请介绍一下你自己。
你能做什么？
我可以回答问题、提供建议、帮你写文章，还可以调用工具查询天气。
1+2等于多少？
告诉我1+2等于多少？
1+2等于3。
2+3等于5，3+4等于7。
10减去4等于6。
3乘以5等于15。
12除以4等于3。
一加一等于二。
请计算 25 + 17 的结果。
25 + 17 = 42
100 - 37 = 63
8 * 9 = 72
81 / 9 = 9
北京今天天气怎么样？
上海明天会下雨吗？
今天北京的天气是晴天，气温25度。
明天广州有雷阵雨，请记得带伞。
深圳今天多云，最高气温30度，最低气温24度。
杭州的天气很好，适合去西湖散步。
成都今天有小雨，空气湿度比较大。
我需要调用工具来查询天气。
根据工具返回的结果，北京今天晴，气温在20到28度之间。
工具调用成功，返回了天气信息。
请使用 Json 格式表示调用的参数。
在调用上述函数时，请使用 Json 格式表示调用的参数。
可用工具
你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。
{"name": "get_today_weather", "arguments": {"city": "北京"}}
{"name": "get_today_weather", "arguments": {"city": "上海"}}
{"name": "get_weather", "arguments": {"city": "广州", "date": "2024-06-01"}}
{"city": "北京", "weather": "晴", "temperature": "25"}
{"city": "上海", "weather": "小雨", "temperature": 22, "humidity": "80%"}
{"type": "function", "function": {"name": "get_today_weather", "description": "获取今天的天气", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}}, "required": ["city"]}}}
{"type": "object", "properties": {}, "required": []}
获取今天的天气
城市名
天气预报说今天会降温。
保持健康的方法包括均衡饮食、规律作息和适量运动。
每天喝足够的水对身体很重要。
建议每天至少睡七个小时。
多吃蔬菜和水果，少吃油炸食品。
运动前要先热身，运动后要拉伸。
如果感冒了，要多休息多喝水。
做番茄炒蛋的步骤：先把鸡蛋打散炒熟，再放入番茄翻炒，最后加盐调味。
煮米饭时，米和水的比例大约是一比一点二。
红烧肉需要先焯水，再加糖炒色，最后小火慢炖一个小时。
包饺子要先和面，再准备馅料。
做蛋糕需要面粉、鸡蛋、牛奶和糖。
去北京旅游可以参观故宫、长城和天坛。
去上海可以看外滩和东方明珠。
去成都一定要吃火锅，还可以看大熊猫。
出门旅行前要检查护照和车票。
坐高铁从北京到上海大约需要五个小时。
旅行时记得带上充电宝和雨伞。
请把下面的句子翻译成英文。
请用一句话总结这篇文章。
请写一首关于春天的诗。
春天来了，花儿开了，小鸟在树上唱歌。
夏天很热，我们去海边游泳。
秋天的树叶变黄了。
冬天下雪了，孩子们在堆雪人。
学习编程需要耐心和练习。
Python是一种很流行的编程语言。
Rust是一种注重安全和性能的系统编程语言。
机器学习是人工智能的一个分支。
深度学习模型需要大量的数据来训练。
大语言模型可以生成文本、回答问题和写代码。
微调可以让模型更好地完成特定任务。
我们使用LoRA对GLM-4进行微调。
训练数据是指令、输入和输出组成的。
指令：请根据输入生成回答。
输入：今天天气很好。
输出：是的，今天阳光明媚。
中国的首都是北京。
长江是中国最长的河流。
地球围绕太阳转动。
一年有十二个月，一周有七天。
Hello! How are you today?
Hi, I am an AI assistant. How can I help you?
Hello, my name is ChatGLM. Nice to meet you.
Good morning! Have a great day.
Thank you very much for your help.
You're welcome. Let me know if you need anything else.
I'm fine, thanks. And you?
What's the weather like in Beijing today?
It's sunny in Beijing, with a high of 28 degrees.
It'll rain tomorrow, so don't forget your umbrella.
What is 1 + 2? The answer is 3.
What is 7 times 8? It is 56.
Please tell me your name.
I am a helpful assistant trained to answer questions.
Drink plenty of water and get enough sleep every day.
Regular exercise is good for your health.
Eat more vegetables and fruit, and less fried food.
To cook rice, rinse it first and then add water.
Boil the pasta for ten minutes, then drain it.
Add salt and pepper to taste.
When you travel abroad, remember to bring your passport.
The train from Beijing to Shanghai takes about five hours.
Paris is famous for the Eiffel Tower.
Please translate the following sentence into Chinese.
Summarize the article in one sentence.
Write a short poem about the sea.
The quick brown fox jumps over the lazy dog.
We fine-tune the model with supervised learning.
The learning rate is 0.0001 and the batch size is 4.
Call the tool get_today_weather with the city name.
The function returns a JSON object with the weather information.
She's reading a book, and they've already finished theirs.
We'll see what we'd do if it's raining.
I'd like a cup of tea, please.
Let's go to the park this afternoon.
def add(a, b):
    return a + b
print(add(1, 2))
for i in range(10):
    print(i * i)
if x > 0 and y < 10:
    return "ok"
fn main() {
    println!("hello, world");
}
let x = vec![1, 2, 3];
<html><body><p>Tom &amp; Jerry</p></body></html>
a < b && b > c
"quoted" and 'single quoted' text
Price: $19.99, discount 20%!
Email: user@example.com; phone: 010-12345678.
2024年6月1日，星期六。
现在是下午3点15分。
这本书的价格是35元。
我今年25岁，住在上海。
他跑了1000米，用时4分30秒。
🙂 今天心情很好！😀
👍 做得好！🎉
😂😂😂
中文和English混合的句子，比如ChatGLM-4模型。
我喜欢用Python写代码，也喜欢Rust。
GLM-4-9B是一个开源的大语言模型。
用户：你好
助手：你好！有什么可以帮你的吗？
用户：北京今天天气怎么样？
助手：我来调用天气工具查询一下。
观察：{"weather": "晴", "temperature": "25度"}
助手：北京今天是晴天，气温25度。
系统：你是一个友好的助手。
请问附近有没有好吃的餐厅？
这家餐厅的菜很好吃，价格也不贵。
请帮我订一张明天去杭州的火车票。
好的，我已经帮你查询了明天的车次。
你觉得这个想法怎么样？
我觉得这个想法很好，值得一试。
为什么天空是蓝色的？
因为大气会散射太阳光中的蓝光。
水在零度会结冰，在一百度会沸腾。
猫和狗都是常见的宠物。
熊猫喜欢吃竹子。
我们一起去看电影吧。
这部电影很有意思。
音乐可以让人放松。
读书使人进步。
学而不思则罔，思而不学则殆。
千里之行，始于足下。
知之为知之，不知为不知，是知也。
"""

CN_CITIES = ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安", "南京", "重庆"]
EN_CITIES = ["Beijing", "Shanghai", "Guangzhou", "Shenzhen", "Hangzhou", "Chengdu", "London", "Tokyo"]
CN_WEATHER = ["晴", "多云", "小雨", "大雨", "阴", "雷阵雨", "小雪"]
EN_WEATHER = ["sunny", "cloudy", "rainy", "windy", "snowy"]
CN_NUMS = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九", "十"]


def build_corpus() -> list[str]:
    lines = [line for line in CORPUS_TEXT.split("\n") if line]
    # Arithmetic Q&A.
    for a in range(0, 10):
        for b in range(0, 10):
            if (a * 7 + b * 3) % 4 == 0:
                lines.append(f"{a}+{b}等于{a + b}。")
                lines.append(f"告诉我{a}+{b}等于多少？{a}+{b}等于{a + b}。")
            if (a + b) % 5 == 1:
                lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}.")
            if a >= b and (a * b) % 3 == 0:
                lines.append(f"{a}减{b}等于{a - b}，{a}乘以{b}等于{a * b}。")
    for a in range(1, 11):
        lines.append(f"{CN_NUMS[a - 1]}加{CN_NUMS[1]}等于{CN_NUMS[a] if a < 10 else '十一'}。")
    # Weather sentences and tool-call JSON.
    for i, city in enumerate(CN_CITIES):
        w = CN_WEATHER[i % len(CN_WEATHER)]
        t = 15 + (i * 3) % 17
        lines.append(f"{city}今天天气怎么样？")
        lines.append(f"{city}今天{w}，气温{t}度。")
        lines.append(json.dumps({"name": "get_today_weather", "arguments": {"city": city}}, ensure_ascii=False))
        lines.append(json.dumps({"city": city, "weather": w, "temperature": t}, ensure_ascii=False))
    for i, city in enumerate(EN_CITIES):
        w = EN_WEATHER[i % len(EN_WEATHER)]
        lines.append(f"The weather in {city} is {w} today, about {10 + 2 * i} degrees.")
        lines.append(json.dumps({"name": "get_today_weather", "arguments": {"city": city}}))
    return lines


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------
def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    n_trained = tok.get_vocab_size(with_added_tokens=False)
    if n_trained < 1500:
        raise SystemExit(f"trained vocab too small: {n_trained}")

    tok.add_special_tokens(
        [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True) for t in SPECIAL_TOKENS]
    )
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    for i, t in enumerate(SPECIAL_TOKENS):
        assert ids[t] == n_trained + i, (t, ids[t], n_trained + i)
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", ids["[gMASK]"]), ("<sop>", ids["<sop>"])],
    )
    return tok


def make_hf_tokenizer(tok: Tokenizer, chat_template: str) -> PreTrainedTokenizerFast:
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    hf_tok.chat_template = chat_template
    return hf_tok


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def config_kwargs(ids: dict[str, int]) -> dict:
    eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    return dict(
        vocab_size=MODEL_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        attention_bias=True,
        rms_norm_eps=1.5625e-07,
        max_position_embeddings=2048,
        hidden_act="silu",
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=eos,
        bos_token_id=None,
        dtype="float32",
    )


@torch.no_grad()
def reinit_weights(model: torch.nn.Module, seed: int, n_used_vocab: int) -> None:
    """Deterministic init with larger scales than HF's std=0.02 so outputs are decisive."""
    gen = torch.Generator().manual_seed(seed)
    # Iterate in sorted name order so the result does not depend on module registration order.
    params = dict(model.named_parameters())
    for name in sorted(params):
        p = params[name]
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".weight") and p.dim() == 2:
            fan_in = p.shape[1]
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        else:
            raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
    # Rows of the LM head beyond the tokenizer's vocabulary get zero weight: their logit is
    # exactly 0, which never wins the argmax, so greedy decoding only emits decodable ids.
    model.lm_head.weight[n_used_vocab:].zero_()


def save_model(kind: str, out_dir: Path, hf_tok: PreTrainedTokenizerFast, seed: int) -> None:
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    kwargs = config_kwargs(ids)
    if kind == "glm":
        config = GlmConfig(**kwargs)
        cls = GlmForCausalLM
    else:
        config = Glm4Config(**kwargs)
        cls = Glm4ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    reinit_weights(model, seed, len(hf_tok))
    model.eval()

    model.generation_config = GenerationConfig(
        eos_token_id=kwargs["eos_token_id"],
        pad_token_id=kwargs["pad_token_id"],
        do_sample=False,
    )

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    hf_tok.save_pretrained(out_dir, save_jinja_files=False)


def check_dir(out_dir: Path, chat_template: str, expect_type: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(out_dir)
    assert tok.chat_template == chat_template, "chat template mismatch after reload"
    gmask, sop = tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    ids = tok("hi").input_ids
    assert ids[:2] == [gmask, sop], ids
    assert tok("hi", add_special_tokens=False).input_ids == ids[2:]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left"
    cfg_json = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg_json["chat_template"] == chat_template
    cfg = AutoConfig.from_pretrained(out_dir)
    assert cfg.model_type == expect_type, cfg.model_type
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    assert len(tok) <= model.config.vocab_size


def main() -> None:
    torch.use_deterministic_algorithms(True)
    chat_template = TEMPLATE_PATH.read_bytes().decode("utf-8")

    tok = build_tokenizer()
    hf_tok = make_hf_tokenizer(tok, chat_template)

    outputs = {
        "glm": (WEIGHTS / "tiny-glm", GLM_SEED),
        "glm4": (WEIGHTS / "tiny-glm4", GLM4_SEED),
    }
    for kind, (out_dir, seed) in outputs.items():
        save_model(kind, out_dir, hf_tok, seed)
        check_dir(out_dir, chat_template, kind)

    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    print(f"trained BPE vocab: {tok.get_vocab_size(with_added_tokens=False)}; tokenizer size: {len(hf_tok)}")
    print("special tokens:", json.dumps(ids))
    for kind, (out_dir, _) in outputs.items():
        for f in sorted(os.listdir(out_dir)):
            print(f"  {out_dir.relative_to(ROOT)}/{f}: {(out_dir / f).stat().st_size} bytes")


if __name__ == "__main__":
    sys.exit(main())
