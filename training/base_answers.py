"""The base model's own greedy answers, cached per base model (a fingerprint of its weights), kind
and token limit, one entry per prompt, so no prompt is ever answered twice: the replay answers
`make data` trains on, and the base's answers to the probe sets that `make select` and `make
compare` score against (the same for every run on that base). Under the user's cache dir, kept
by `make clean`; an interrupted run keeps the chunks it finished."""
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from training.atomic import write_text_atomic

VERSION = 1  # bump when the chat format or generation changes what an answer would be


def fingerprint(base_model: str) -> str:
    """What identifies the base model's weights: its config and weight files for a folder, the
    id for a hub model."""
    folder = Path(base_model)
    if not folder.is_dir():
        return base_model
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    return json.dumps([(folder / "config.json").read_text(encoding="utf-8"), files])


def cached(kind: str, base_model: str, prompts: list[str], max_new_tokens: int, load=None) -> list:
    """Greedy single-turn answers (chat.generation.Answer) of the base model to `prompts`; the
    model is loaded only when a prompt is new, by `load()` when given (a caller asking several
    times shares one model that way)."""
    from chat.generation import BATCH_SIZE, Answer, Sampling, generate_batch
    from chat.loading import cache_dir, load_model
    key = hashlib.sha256(json.dumps([VERSION, kind, fingerprint(base_model), max_new_tokens]).encode()).hexdigest()
    cache = cache_dir() / kind / f"{key[:20]}.json"
    known = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    missing = [p for p in dict.fromkeys(prompts) if p not in known]
    if missing:
        loaded = load() if load else load_model(base_model)
        greedy = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=max_new_tokens)
        for start in range(0, len(missing), BATCH_SIZE):  # a batch per progress line and cache write
            chunk = missing[start:start + BATCH_SIZE]
            answers = generate_batch(loaded, [[{"role": "user", "content": p}] for p in chunk], sampling=greedy)
            known.update({p: asdict(a) for p, a in zip(chunk, answers)})
            write_text_atomic(cache, json.dumps(known, ensure_ascii=False))
            done = start + len(chunk)
            print(f"{kind}: base model answered {done}/{len(missing)}", end="\r" if done < len(missing) else "\n",
                  flush=True)
    return [Answer(**known[p]) for p in prompts]
