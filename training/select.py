"""Score checkpoints and choose one, instead of converting the newest (`ls -t`).

Each candidate (a checkpoint, at an adapter scale) answers the SELECTION probes of
training/quality.py through chat/ batched greedy generation, in the model's own chat format:
identity (held-out paraphrases answered as NAME's assistant), retention (checkable facts the base
model knew), leakage (open-ended prompts whose answer names NAME), and the NLL drift: how much
worse than the base model it predicts the base model's own answers to the open prompts (nats per
token; over-fitting shows up as this climbing).

A candidate passes when identity >= IDENTITY_TARGET, retention >= RETENTION_TARGET and leakage <=
LEAKAGE_MAX. Scaling the adapter down (weight averaging with the base, for LoRA) trades identity
for retention and leakage: SCALES are tried on the checkpoint with the best identity. When no
candidate passes, the step fails, naming the best candidates and the knob to turn."""
import json
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from chat.generation import BATCH_SIZE, Answer
from training import plots, quality, runner
from training.atomic import write_text_atomic

RULES = ("least-loss", "earliest", "last")
LOSS_LOG = re.compile(r"Iter\(train\) \[\s*(\d+)/\d+\].*?\sloss: ([\d.]+)")


@dataclass(frozen=True)
class Targets:
    identity: float = 0.8    # IDENTITY_TARGET: share of held-out identity questions, at least
    retention: float = 0.9   # RETENTION_TARGET: share of the base model's right answers kept, at least
    leakage: float = 0.1     # LEAKAGE_MAX: share of open prompts answered with NAME, at most

    def __post_init__(self):
        for knob, value in (("IDENTITY_TARGET", self.identity), ("RETENTION_TARGET", self.retention),
                            ("LEAKAGE_MAX", self.leakage)):
            if not 0 <= value <= 1:
                raise ValueError(f"{knob}={value} must be in [0, 1]")

    def misses(self, s: dict) -> list[str]:
        """What a candidate falls short on, with the knob that moves it (empty: it passes)."""
        out = []
        if s["identity"] < self.identity:
            out.append(f"identity {s['identity']:.2f} < {self.identity} (train more: EPOCHS, LR, or RATIO up)")
        if s["retention"] < self.retention:
            out.append(f"retention {s['retention']:.2f} < {self.retention} (REPLAY up, RATIO or LR down)")
        if s["leakage"] > self.leakage:
            out.append(f"leakage {s['leakage']:.2f} > {self.leakage} (REPLAY up, RATIO down, fewer EPOCHS)")
        return out

    def shortfall(self, s: dict) -> float:
        return (max(0, self.identity - s["identity"]) + max(0, self.retention - s["retention"])
                + max(0, s["leakage"] - self.leakage))


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


def set_scale(loaded, scale: float) -> None:
    """Multiply every LoRA update by `scale` (1 = as trained); merge applies it via lora_alpha."""
    from peft.tuners.lora import LoraLayer
    for module in loaded.model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", scale)  # scaling = scale * lora_alpha / r


def answer_nll(loaded, prompts: list[str], answers: list[Answer]) -> float:
    """Mean negative log-likelihood per token of `answers` (with the stop token where they ended),
    BATCH_SIZE conversations per forward pass, right-padded (padding comes after every token
    that counts, so it changes nothing a causal model computes for them)."""
    tokenizer, total, count = loaded.tokenizer, 0.0, 0
    stop = tokenizer.convert_ids_to_tokens(loaded.stop_ids[0])
    rows = []
    for prompt, answer in zip(prompts, answers):
        prefix = loaded.format.build_prompt([{"role": "user", "content": prompt}])
        prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids
        answer_ids = tokenizer(answer.text + (stop if answer.ended else ""), add_special_tokens=False).input_ids
        rows.append((prefix_ids + answer_ids, len(prefix_ids)))
    for start in range(0, len(rows), BATCH_SIZE):
        batch = rows[start:start + BATCH_SIZE]
        width = max(len(seq) for seq, _ in batch)
        ids = torch.tensor([seq + [0] * (width - len(seq)) for seq, _ in batch])
        mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq, _ in batch])
        # Each row's targets: its answer tokens; the prompt and the padding are ignored (-100).
        targets = torch.tensor([[-100] * prefix + seq[prefix:] + [-100] * (width - len(seq))
                                for seq, prefix in batch])
        with torch.no_grad():
            logits = loaded.model(input_ids=ids.to(loaded.model.device),
                                  attention_mask=mask.to(loaded.model.device)).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets[:, 1:].to(logits.device),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((targets[:, 1:] != -100).sum())
    return total / max(count, 1)


def evaluate(model, name: str, base: dict) -> dict:
    answers = quality.answer_probes(model, quality.SELECTION)
    scores = quality.score(quality.SELECTION, answers, name, base["known"])
    drift = answer_nll(model, quality.SELECTION.open, base["answers"]["open"]) - base["nll"]
    return {**scores, "retention_loss": round(drift, 4),
            "answers": {"identity": dict(zip(quality.SELECTION.identity, (a.text for a in answers["identity"]))),
                        "open": dict(zip(quality.SELECTION.open, (a.text for a in answers["open"])))}}


def choose(candidates: list[dict], targets: Targets, rule: str) -> tuple[dict | None, str]:
    """The chosen candidate and why; None when none passes (the caller fails the step)."""
    if rule not in RULES:
        raise ValueError(f"unknown SELECT_RULE={rule!r}: use one of {', '.join(RULES)}")
    if rule == "last":
        last = max((c for c in candidates if c["scale"] == 1), key=lambda c: c["iter"])
        return last, "the last checkpoint (SELECT_RULE=last)"
    passing = [c for c in candidates if not targets.misses(c)]
    if not passing:
        return None, "no candidate meets every target"
    if rule == "earliest":
        best = min(passing, key=lambda c: (c["iter"], -c["scale"]))
        return best, "the earliest checkpoint that meets every target"
    best = min(passing, key=lambda c: (round(c["retention_loss"], 4), c["iter"], -c["scale"]))
    return best, "meets every target with the least NLL drift from the base model"


def failure(candidates: list[dict], targets: Targets) -> str:
    ranked = sorted(candidates, key=lambda c: (targets.shortfall(c), c["iter"]))[:3]
    lines = [f"  iter {c['iter']} scale {c['scale']}: " + "; ".join(targets.misses(c)) for c in ranked]
    return ("no checkpoint meets the targets (IDENTITY_TARGET, RETENTION_TARGET, LEAKAGE_MAX); the "
            "closest:\n" + "\n".join(lines) + "\nTurn the knobs named above, or convert one anyway "
            "with CKPT=<checkpoint> (or SELECT_RULE=last)")


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(iteration, loss) from the training log; a resumed run's later lines win."""
    log = run_dir / "logs" / "fit.log"
    points = {}
    if log.is_file():
        for match in LOSS_LOG.finditer(log.read_text(encoding="utf-8", errors="replace")):
            points[int(match.group(1))] = float(match.group(2))
    return sorted(points.items())


def report(c: dict) -> str:
    return (f"iter {c['iter']:>5} x{c['scale']:<4}: identity {c['identity']:.2f}  retention "
            f"{c['retention']:.2f} (zh {c['retention_zh']:.2f})  leakage {c['leakage']:.2f}  "
            f"NLL drift {c['retention_loss']:+.3f}")


def spaced(found: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """The checkpoints without one that lies less than half the usual interval before the next:
    xtuner also saves the last iteration, often a few after a regular save (120 and 123), and the
    two score alike (the learning rate is ~0 there), so the later one stands for both."""
    if len(found) < 3:
        return found
    usual = statistics.median(b[0] - a[0] for a, b in zip(found, found[1:]))
    return [a for a, b in zip(found, found[1:]) if b[0] - a[0] >= usual / 2] + [found[-1]]


def latest(found: list[tuple[int, Path]], count: int) -> list[tuple[int, Path]]:
    """SELECT_LAST: the last `count` checkpoints by iteration (0: all of them)."""
    return found[-count:] if count > 0 else found


def run(run_dir: Path, targets: Targets, rule: str, scales: list[float] = (1.0,),
        max_checkpoints: int = 0) -> dict:
    """Score the checkpoints (the last `max_checkpoints` when > 0), then `scales` on the one with
    the best identity; write scores.json and scores.png; fail when nothing passes."""
    from chat.loading import load_model
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    found = runner.checkpoints(run_dir)
    if not found:
        raise ValueError(f"no checkpoint in {run_dir / 'work'}: run `make fit` first")
    found = latest(spaced(found), max_checkpoints)
    name = info["name"]
    loaded = load_model(info["base_model"])
    answers = quality.base_probe_answers(info["base_model"], quality.SELECTION, lambda: loaded)
    base = {"answers": answers, "known": quality.known(quality.SELECTION, answers)}
    base["nll"] = answer_nll(loaded, quality.SELECTION.open, answers["open"])
    base_scores = {**quality.score(quality.SELECTION, answers, name, base["known"]), "retention_loss": 0.0}
    print(f"base model: identity {base_scores['identity']:.2f}  leakage {base_scores['leakage']:.2f}  "
          f"knows {base_scores['facts_known_by_base']} of the held-out facts (en, zh)")
    model = with_lora(loaded, checkpoint_weights(found[0][1]), info)
    candidates = []
    for iteration, path in found:
        load_weights(model, checkpoint_weights(path))
        candidates.append({"iter": iteration, "checkpoint": str(path), "scale": 1.0, **evaluate(model, name, base)})
        print(report(candidates[-1]), flush=True)
    strongest = max(candidates, key=lambda c: (c["identity"], -c["retention_loss"]))
    if strongest["identity"] >= targets.identity:
        load_weights(model, checkpoint_weights(Path(strongest["checkpoint"])))
        for scale in sorted(set(scales) - {1.0}, reverse=True):
            set_scale(model, scale)
            candidates.append({**strongest, "scale": scale, **evaluate(model, name, base)})
            print(report(candidates[-1]), flush=True)
        set_scale(model, 1.0)
    selected, why = choose(candidates, targets, rule)
    result = {"targets": targets.__dict__, "rule": rule, "why": why, "base": base_scores,
              "base_nll": round(base["nll"], 4), "selection_questions": quality.SELECTION.identity,
              "candidates": candidates, "selected": selected, "loss_curve": loss_curve(run_dir)}
    write_text_atomic(run_dir / "scores.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    plots.scores_png(result, run_dir / "scores.png")
    print(f"wrote {run_dir / 'scores.json'} and {run_dir / 'scores.png'}")
    if selected is None:
        raise runner.StepFailed(failure(candidates, targets))
    print(f"selected iter {selected['iter']} at scale {selected['scale']}: {why}")
    return result


def chosen_scale(run_dir: Path) -> float:
    scores = run_dir / "scores.json"
    if not scores.is_file():
        return 1.0
    return json.loads(scores.read_text(encoding="utf-8"))["selected"].get("scale", 1.0)


def scale_adapter(adapter_dir: Path, scale: float) -> None:
    """Bake the chosen adapter scale into adapter_config.json (lora_alpha), so `xtuner convert
    merge` and any PEFT user apply it."""
    if scale == 1:
        return
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["lora_alpha"] = config["lora_alpha"] * scale
    write_text_atomic(path, json.dumps(config, indent=2) + "\n")
