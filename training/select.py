"""Score every checkpoint and choose one, instead of converting the newest (`ls -t`).

identity   share of held-out identity questions (paraphrases never trained on) whose greedy
           answer names NAME and ends by itself (an answer that runs on to the token limit is
           the babbling of an under- or over-trained model); higher is better.
retention  how much worse than the base model a checkpoint predicts the base model's own
           answers to held-out general prompts: mean token NLL, checkpoint minus base (nats);
           lower is better. Over-fitting shows up as this climbing.

Evaluation goes through chat/ (template, generation) exactly as the app serves."""
import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from chat.generation import Sampling, reply
from chat.loading import load_model
from chat.template import IM_END, build_prompt
from training import plots, replay, runner
from training.atomic import write_text_atomic
from training.data import HELD_OUT_QUESTIONS

RULES = ("least-loss", "earliest", "last")
GREEDY = Sampling(temperature=0, max_new_tokens=64, repetition_penalty=1.0)  # plain greedy
LOSS_LOG = re.compile(r"Iter\(train\) \[\s*(\d+)/\d+\].*?\sloss: ([\d.]+)")


def checkpoint_weights(path: Path) -> dict:
    """The trainable (LoRA) weights xtuner saved, keyed as in the PEFT model."""
    if path.is_dir():  # a DeepSpeed checkpoint is a folder
        state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {key.removeprefix("llm."): value for key, value in state.items() if "lora_" in key}


def with_lora(loaded, weights: dict, info: dict):
    """Wrap the base model with LoRA layers shaped like the checkpoint's."""
    from peft import LoraConfig, get_peft_model
    targets = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in weights})
    config = LoraConfig(r=info["lora_r"], lora_alpha=info["lora_alpha"], lora_dropout=0.0,
                        target_modules=targets, task_type="CAUSAL_LM")
    return replace(loaded, model=get_peft_model(loaded.model, config).eval())


def load_weights(loaded, weights: dict) -> None:
    result = loaded.model.load_state_dict(weights, strict=False)
    missing_lora = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing_lora:
        raise runner.StepFailed(f"checkpoint does not fit the model: unexpected "
                                f"{result.unexpected_keys[:3]}, missing {missing_lora[:3]}")


def answer_nll(loaded, prompts: list[str], answers: list[str]) -> float:
    """Mean negative log-likelihood per token of `answers` (each ended by <|im_end|>)."""
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers):
        prefix = build_prompt([{"role": "user", "content": prompt}])
        tokenizer = loaded.tokenizer
        prefix_ids = tokenizer(prefix, add_special_tokens=False, return_tensors="pt").input_ids
        answer_ids = tokenizer(answer + IM_END, add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([prefix_ids, answer_ids], dim=1).to(loaded.model.device)
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits[0, prefix_ids.shape[1] - 1:-1].float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, prefix_ids.shape[1]:], reduction="sum").item()
        count += answer_ids.shape[1]
    return total / count


def identity_score(loaded, name: str) -> tuple[float, dict]:
    answers = {q: reply(loaded, [{"role": "user", "content": q}], sampling=GREEDY) for q in HELD_OUT_QUESTIONS}
    return sum(names_and_ends(loaded, a, name) for a in answers.values()) / len(answers), answers


def names_and_ends(loaded, answer: str, name: str) -> bool:
    # The stop token is not in the text: an answer that stopped by itself is shorter than the limit.
    length = len(loaded.tokenizer(answer, add_special_tokens=False).input_ids)
    return name in answer and length < GREEDY.max_new_tokens - 1


def choose(scores: list[dict], target: float, rule: str) -> tuple[dict, str]:
    if rule not in RULES:
        raise ValueError(f"unknown SELECT_RULE={rule!r}: use one of {', '.join(RULES)}")
    if rule == "last":
        return scores[-1], "the last checkpoint (SELECT_RULE=last)"
    passing = [s for s in scores if s["identity"] >= target]
    if not passing:
        best = max(scores, key=lambda s: (s["identity"], -s["retention_loss"], -s["iter"]))
        return best, (f"no checkpoint reached IDENTITY_TARGET={target}: chose the best identity "
                      f"score ({best['identity']:.2f}); train longer or lower the target")
    if rule == "earliest":
        return passing[0], f"the earliest checkpoint with identity >= {target}"
    best = min(passing, key=lambda s: (round(s["retention_loss"], 4), s["iter"]))
    return best, f"identity >= {target} with the least retention loss (earliest on ties)"


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(iteration, loss) from the training log; a resumed run's later lines win."""
    log = run_dir / "logs" / "fit.log"
    points = {}
    if log.is_file():
        for match in LOSS_LOG.finditer(log.read_text(encoding="utf-8", errors="replace")):
            points[int(match.group(1))] = float(match.group(2))
    return sorted(points.items())


def run(run_dir: Path, target: float, rule: str) -> dict:
    if not 0 <= target <= 1:
        raise ValueError(f"IDENTITY_TARGET={target} must be in [0, 1]")
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    found = runner.checkpoints(run_dir)
    if not found:
        raise ValueError(f"no checkpoint in {run_dir / 'work'}: run `make fit` first")
    base = load_model(info["base_model"])
    prompts = replay.HELD_OUT_PROMPTS
    base_answers = [reply(base, [{"role": "user", "content": p}], sampling=GREEDY) or "…" for p in prompts]
    base_nll = answer_nll(base, prompts, base_answers)
    model = with_lora(base, checkpoint_weights(found[0][1]), info)
    scores = []
    for iteration, path in found:
        load_weights(model, checkpoint_weights(path))
        identity, answers = identity_score(model, info["name"])
        retention = answer_nll(model, prompts, base_answers) - base_nll
        scores.append({"iter": iteration, "checkpoint": str(path), "identity": identity,
                       "retention_loss": round(retention, 4), "answers": answers})
        print(f"iter {iteration:>6}: identity {identity:.2f}  retention loss {retention:+.3f} nats/token")
    selected, why = choose(scores, target, rule)
    print(f"selected iter {selected['iter']}: {why}")
    result = {"identity_target": target, "rule": rule, "why": why, "base_nll": round(base_nll, 4),
              "held_out_questions": HELD_OUT_QUESTIONS, "held_out_prompts": prompts,
              "checkpoints": scores, "selected": selected, "loss_curve": loss_curve(run_dir)}
    write_text_atomic(run_dir / "scores.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    plots.scores_png(result, run_dir / "scores.png")
    print(f"wrote {run_dir / 'scores.json'} and {run_dir / 'scores.png'}")
    return result
