"""General prompts the kit ships (written by us, Chinese and English). The base model's own
answers to PROMPTS are mixed into training (replay) so fine-tuning keeps its general
behaviour; HELD_OUT_PROMPTS are never trained on and measure retention per checkpoint."""
import hashlib
import json
import random
from pathlib import Path

import torch

from training.atomic import write_text_atomic

PROMPTS = [
    "今天天气怎么样？", "推荐一本好看的书。", "怎样才能睡得更好？", "给我讲个笑话吧。",
    "如何学习一门新的语言？", "早餐吃什么比较健康？", "周末可以做些什么？", "怎么做番茄炒蛋？",
    "What is the capital of France?", "Give me a tip for staying focused.",
    "How do I boil an egg?", "Suggest a name for a cat.", "What is a good way to learn to code?",
    "Tell me something interesting about the ocean.", "How can I save money each month?",
    "Write a short greeting for a birthday card.",
]
HELD_OUT_PROMPTS = [
    "怎样保持好心情？", "喝咖啡有什么好处？", "如何整理房间？",
    "How do plants make food?", "What should I pack for a picnic?", "Why is the sky blue?",
]

# The tutorial demo's sampling: replay what users of the base model actually see.
SAMPLING = dict(temperature=0.7, top_p=0.8, max_new_tokens=128)


def fingerprint(base_model: str) -> str:
    """What identifies the base model's weights: its config and weight files for a folder, the
    id for a hub model."""
    folder = Path(base_model)
    if not folder.is_dir():
        return base_model
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    return json.dumps([(folder / "config.json").read_text(encoding="utf-8"), files])


def base_answers(base_model: str, count: int) -> list[tuple[str, str]]:
    """`count` (prompt, answer) pairs written by the base model itself, cycling through PROMPTS
    with a fixed seed per answer; cached, since the base model does not change."""
    if count < 0:
        raise ValueError(f"REPLAY={count} must be >= 0")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    key = hashlib.sha256(json.dumps([fingerprint(base_model), prompts, SAMPLING]).encode()).hexdigest()
    from chat.loading import cache_dir
    cache = cache_dir() / "replay" / f"{key[:20]}.json"
    if cache.is_file():
        print(f"replay: {count} base-model answers from cache {cache}")
        return [tuple(pair) for pair in json.loads(cache.read_text(encoding="utf-8"))]
    from chat.generation import Sampling, reply
    from chat.loading import load_model
    loaded = load_model(base_model)
    pairs = []
    for i, prompt in enumerate(prompts):
        torch.manual_seed(i)
        pairs.append((prompt, reply(loaded, [{"role": "user", "content": prompt}], sampling=Sampling(**SAMPLING))))
        print(f"replay: base model answered {i + 1}/{count}", end="\r" if i + 1 < count else "\n", flush=True)
    write_text_atomic(cache, json.dumps(pairs, ensure_ascii=False))
    return pairs


def mix_in(records: list[dict], pairs: list[tuple[str, str]], seed: int = 0) -> list[dict]:
    """Add the replayed answers (empty ones skipped: there is nothing to learn from them)."""
    from training.data import conversation
    replayed = [conversation(prompt, answer) for prompt, answer in pairs if answer.strip()]
    mixed = records + replayed
    random.Random(seed).shuffle(mixed)
    return mixed
