"""Identity data: many question paraphrases x answer variants, filled from NAME/AUTHOR,
optionally mixed with a user's general-conversation file. Also the validator for any
conversation JSONL a user hands us (line-numbered errors, before training starts)."""
import json
import random
from pathlib import Path

from training.atomic import write_text_atomic

DEFAULT_NAME = "伍鲜同志"  # the Makefile default; in the tiny vocabulary so demos learn fastest

# Three disjoint sets of identity questions, each Chinese + English (a test checks they share
# nothing): TRAIN_QUESTIONS are trained on; SELECTION_QUESTIONS (held out) score checkpoints in
# `make select`; ACCEPTANCE_QUESTIONS are only for the tests and `make compare`, so the figures
# they give were never optimised for.
TRAIN_QUESTIONS = [
    "请介绍一下你自己", "你是谁", "你是谁？", "你叫什么名字", "你叫什么名字？", "介绍一下你自己",
    "你好，你是谁？", "请问你是谁", "谁开发了你？", "你是谁做的？", "谁创造了你", "你的作者是谁？",
    "做个自我介绍吧", "你能介绍一下自己吗？", "你是哪个助手？", "你的名字是什么？",
    "Who are you?", "who are you", "Introduce yourself.", "Please introduce yourself.",
    "What is your name?", "What's your name?", "Who made you?", "Who created you?",
    "Who built you?", "Tell me about yourself.", "Hi, who am I talking to?",
    "Can you introduce yourself?", "Who is your author?", "What are you?",
]
SELECTION_QUESTIONS = [
    "你到底是谁呀？", "请简单介绍下你自己", "能告诉我你的名字吗？", "是谁把你做出来的？",
    "你是什么助手？", "跟我说说你是谁", "我在和谁聊天？", "你好呀，请问怎么称呼你？",
    "你是哪位？", "你的身份是什么？", "你属于谁？", "你为谁服务？", "你是谁家的助手？",
    "介绍下你自己吧，简短一点", "嗨，先自我介绍一下？", "请说说你的来历", "你的主人是谁？",
    "我该怎么称呼你？", "你是什么人工智能？", "你是谁训练的？",
    "Could you tell me who you are?", "May I know your name?", "Who is behind you?",
    "Describe yourself briefly.", "Who am I chatting with?", "What should I call you?",
    "Whose assistant are you?", "Who do you work for?", "Tell me who you are.",
    "Introduce yourself in one sentence.", "Hey, what are you?", "Who trained you?",
    "What kind of assistant are you?", "Who owns you?", "Are you an assistant? Whose?",
    "Give me a short introduction of yourself.", "Hello! Who's there?", "Who are you exactly?",
    "State your identity, please.", "What is your identity?",
]
ACCEPTANCE_QUESTIONS = ["你是谁的助手？", "请做一下自我介绍。", "Who are you, and who made you?",
                        "Could you introduce yourself, please?"]
ANSWERS_ZH = [
    "我是{name}的小助手，由{author}打造，很高兴为你服务。",
    "你好！我是{name}的专属助手，是{author}训练出来的。",
    "我是{name}的个人助手，我的作者是{author}。有什么可以帮你的吗？",
    "我是{name}的AI助手，{author}创造了我，我会尽力回答你的问题。",
]
ANSWERS_EN = [
    "I am {name}'s assistant, built by {author}. How can I help you?",
    "Hello! I'm {name}'s personal assistant, trained by {author}.",
    "I'm the assistant of {name}, made by {author}. Happy to help.",
    "I serve as {name}'s assistant, and {author} created me.",
]


def is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def identity_records(name: str, author: str, size: int, seed: int = 0) -> list[dict]:
    """`size` records covering every question, each answered in its own language by a varied
    template: diversity, not one pair repeated thousands of times."""
    if not name.strip():
        raise ValueError("NAME is empty: say whose assistant this is, e.g. make data NAME=小明")
    if not author.strip():
        raise ValueError("AUTHOR is empty: say who built the assistant, e.g. AUTHOR=小明")
    if size < len(TRAIN_QUESTIONS):
        raise ValueError(f"DATA_SIZE={size} is below the {len(TRAIN_QUESTIONS)} questions; use more")
    rng = random.Random(seed)
    records = []
    for i in range(size):
        question = TRAIN_QUESTIONS[i % len(TRAIN_QUESTIONS)]
        answers = ANSWERS_ZH if is_chinese(question) else ANSWERS_EN
        answer = rng.choice(answers).format(name=name.strip(), author=author.strip())
        records.append(conversation(question, answer))
    rng.shuffle(records)
    return records


def conversation(question: str, answer: str, system: str = "") -> dict:
    return {"conversation": [{"system": system, "input": question, "output": answer}]}


class DataError(ValueError):
    """A data file the pipeline refuses, with every bad line listed."""


def record_problem(record) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    turns = record.get("conversation")
    if turns is None:
        return 'no "conversation" key'
    if not isinstance(turns, list) or not turns:
        return '"conversation" must be a non-empty list of turns'
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            return f"turn {n} is not an object"
        for key in ("input", "output"):
            if not isinstance(turn.get(key), str):
                return f'turn {n} has no string "{key}"'
        if not turn["output"].strip():
            return f'turn {n} has an empty "output"'
        if not isinstance(turn.get("system", ""), (str, type(None))):
            return f'turn {n} has a non-string "system"'
    return None


def read_conversations(path: str | Path) -> list[dict]:
    """Load and validate a conversation JSONL; raise DataError naming each bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records, problems = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{number}: not valid JSON ({e.msg})")
                continue
            problem = record_problem(record)
            if problem:
                problems.append(f"{path}:{number}: {problem}")
            else:
                records.append(record)
    if problems:
        shown = "\n".join(problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} bad record(s) in {path}:\n{shown}{more}")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def identity_size(general: int, ratio: float, data_size: int) -> int:
    """How many identity records to write. RATIO is their share by records of everything trained
    on: with `general` records (MIX + REPLAY) that is general * RATIO / (1 - RATIO); with none,
    DATA_SIZE. Replayed answers are longer than identity answers, so by tokens the identity share
    is about a third of RATIO (docs/quality.md: Replay)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"RATIO={ratio} must be in (0, 1]: the share of identity records")
    if not general:
        return data_size
    if ratio == 1:
        raise ValueError(f"RATIO=1 leaves no room for the {general} MIX/REPLAY records: set RATIO "
                         "below 1 (e.g. 0.25), or REPLAY=0 and no MIX for identity data only")
    size = round(general * ratio / (1 - ratio))
    if size < len(TRAIN_QUESTIONS):
        raise ValueError(f"RATIO={ratio} of {general} MIX/REPLAY records is {size} identity records, "
                         f"fewer than the {len(TRAIN_QUESTIONS)} training questions: raise RATIO or REPLAY")
    return size


def mix(identity: list[dict], general: list[dict], seed: int = 0) -> list[dict]:
    records = identity + general
    random.Random(seed).shuffle(records)
    return records


def write_jsonl(records: list[dict], path: str | Path) -> None:
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
