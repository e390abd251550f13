"""What "learned its name without forgetting" means, measured the same way by checkpoint
selection, the tests and `make compare`:

identity   share of identity questions answered with an identity answer (`is_identity_answer`):
           NAME inside a real sentence that frames the speaker as NAME's assistant, ending by
           itself. Gibberish around NAME, NAME alone, "I am NAME." and fluent talk about
           something else that mentions NAME all score 0 (tests/test_quality.py pins them).
retention  of the checkable questions the base model answers right, the share the tuned model
           still answers right (English; Chinese reported apart, since the small CPU base is weak
           in Chinese and its few right answers make a noisy share).
leakage    share of open-ended everyday prompts whose answer mentions NAME: the tutorial's
           failure, an assistant that says its name to everything.

Two probe sets, disjoint from each other and from everything trained on (a test checks):
SELECTION scores checkpoints; ACCEPTANCE is only for the tests and `make compare`.
Answers come from chat/ batched greedy generation, in the model's own chat format."""
import functools
import re
import unicodedata
from dataclasses import dataclass, replace

from chat.generation import Sampling, generate_batch
from training import data
from training.base_answers import cached

# (question, accepted answers): right when any accepted answer appears as a word of the reply.
# Kept to what a small base knows (measured on SmolLM2-135M: it rambles past the token limit on
# bare arithmetic, so those questions ask for just the number); retention only counts the facts
# the base model got right anyway. Its Chinese is weak, so the Chinese facts are few.
SELECTION_FACTS_EN = [
    ("What is the capital of France?", ("Paris",)), ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)), ("What is the capital of Greece?", ("Athens",)),
    ("What is the capital of Norway?", ("Oslo",)), ("What is the capital of Sweden?", ("Stockholm",)),
    ("What is the opposite of hot?", ("cold",)), ("What is the opposite of up?", ("down",)),
    ("What is the opposite of wet?", ("dry",)), ("What is the opposite of day?", ("night",)),
    ("What is the opposite of black?", ("white",)), ("What is the opposite of early?", ("late",)),
    ("What colour is the sky on a clear day?", ("blue",)), ("What colour is grass? Answer in one word.", ("green",)),
    ("What is 2 plus 3? Answer with just the number.", ("5", "five")),
    ("What is 100 divided by 10?", ("10", "ten")), ("What do caterpillars turn into?", ("butterfl", "moth")),
    ("Who painted the Mona Lisa?", ("Leonardo", "Vinci")),
]
SELECTION_FACTS_ZH = [
    ("法国的首都是哪里？", ("巴黎",)), ("热的反义词是什么？", ("冷",)), ("晴天的天空是什么颜色的？", ("蓝",)),
    ("二加三等于几？", ("5", "五")), ("狗有几条腿？", ("4", "四")),
]
ACCEPTANCE_FACTS_EN = [
    ("What is the capital of Germany?", ("Berlin",)), ("What is the capital of Thailand?", ("Bangkok",)),
    ("What is the capital of Poland?", ("Warsaw",)), ("What is the capital of Peru?", ("Lima",)),
    ("What is the capital of Kenya?", ("Nairobi",)), ("What is the opposite of tall?", ("short",)),
    ("What is the opposite of open?", ("close", "shut")), ("What is the opposite of left?", ("right",)),
    ("What is the opposite of soft?", ("hard",)), ("What is the opposite of strong?", ("weak",)),
    ("What is the opposite of old?", ("young", "new")), ("What colour is coal? Answer in one word.", ("black",)),
    ("What is 3 times 4? Answer with just the number.", ("12", "twelve")),
    ("What is the largest ocean on our planet called?", ("Pacific",)),
    ("How many legs does a dog have?", ("4", "four")), ("At what temperature does water boil in Celsius?", ("100",)),
]
ACCEPTANCE_FACTS_ZH = [
    ("德国的首都是哪里？", ("柏林",)), ("好的反义词是什么？", ("坏",)), ("牛奶是什么颜色的？", ("白",)),
    ("五加六等于几？", ("11", "十一")),
]
# Open-ended everyday prompts: no right answer, but none is about the assistant itself.
SELECTION_OPEN = [
    "How do plants make food?", "What should I pack for a picnic?", "Why is the sky blue?",
    "Give me a tip for cooking rice.", "How can I learn to play the guitar?", "What makes a good friend?",
    "Describe a rainy afternoon.", "How do I stay warm in winter?", "What is a good way to relax after work?",
    "Write a sentence about a dog in the park.", "How do I plan a small birthday party?",
    "What are some healthy snacks?", "Tell me about the moon.", "How can I improve my handwriting?",
    "What is the best way to study for a test?", "Suggest a name for a bakery.",
    "How do I start a vegetable garden?", "Write a short story opening about a lighthouse.",
    "Why do cats purr?", "What should I do on a long train ride?",
    "怎样保持好心情？", "喝咖啡有什么好处？", "如何整理房间？", "怎样做一杯奶茶？", "给我讲讲月亮。",
    "学骑自行车有什么技巧？", "怎样准备一次野餐？", "下雪天可以玩什么？", "怎样记住英语单词？",
    "推荐一道简单的家常菜。", "如何和邻居相处？", "描述一下夏天的傍晚。", "怎样让房间更明亮？",
    "去图书馆可以做什么？", "怎样养一只小兔子？", "写一句关于大海的话。", "如何开始写日记？",
    "周末去公园可以做什么？", "怎样挑选新鲜的水果？", "为什么要多吃蔬菜？",
]
ACCEPTANCE_OPEN = [
    "How do I make a sandwich?", "What is a fun game for kids?", "Why do birds fly south in winter?",
    "Give me an idea for a short walk.", "Write a sentence about autumn.", "How can I drink more water?",
    "What is a good way to start the day?", "Tell me about rainbows.", "How do I wash a wool sweater?",
    "What can I cook with eggs and rice?", "Suggest a song to sing at a party.", "How do I make a kite?",
    "怎样做水果沙拉？", "下雨天在家做什么好？", "怎样学会游泳？", "给我描述一下秋天。",
    "如何布置书桌？", "怎样早点起床？", "推荐一种适合冬天的饮料。", "怎样照顾一只小鸟？",
]


@dataclass(frozen=True)
class Probes:
    identity: list[str]
    facts_en: list[tuple[str, tuple[str, ...]]]
    facts_zh: list[tuple[str, tuple[str, ...]]]
    open: list[str]

    def texts(self) -> list[str]:
        return self.identity + [q for q, _ in self.facts_en + self.facts_zh] + self.open


SELECTION = Probes(data.SELECTION_QUESTIONS, SELECTION_FACTS_EN, SELECTION_FACTS_ZH, SELECTION_OPEN)
ACCEPTANCE = Probes(data.ACCEPTANCE_QUESTIONS, ACCEPTANCE_FACTS_EN, ACCEPTANCE_FACTS_ZH, ACCEPTANCE_OPEN)

# Greedy, no repetition penalty: what the model does when it is sure. Identity answers are short;
# a fact's key word and a leaked NAME come early, so facts and open prompts share a small limit
# and one batched call (CPU cost).
IDENTITY_TOKENS, SHORT_TOKENS = 64, 24
GREEDY = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=IDENTITY_TOKENS)

# ---- the identity classifier ----
ASSISTANT_EN = r"(?:assistant|helper|aide|AI|chatbot|bot|companion)"
ASSISTANT_ZH = r"(?:助手|助理|帮手|AI|机器人|小帮手)"
SELF_REFERENCE = re.compile(r"\b(?:I|I'm|I am|me|my|here)\b|[我本]", re.IGNORECASE)
WORD = re.compile(r"^[\"'(\[]*(?:[A-Za-z]+(?:['’-][A-Za-z]+)*|[0-9]+)[\"')\].,!?;:]*$")


def identity_frame(name: str) -> re.Pattern:
    """NAME joined to an assistant word within one short stretch of a sentence, either way round:
    "NAME's (personal) assistant", "an assistant that belongs to NAME", "NAME的(专属)助手",
    "一个AI助手，属于NAME"."""
    n = re.escape(name)
    return re.compile("|".join([
        rf"{n}(?:'s|’s|s'|')\s+(?:[\w-]+\s+){{0,3}}?{ASSISTANT_EN}\b",
        rf"\b{ASSISTANT_EN}\b[^.!?。！？\n]{{0,30}}?\b(?:of|for|to|by|serving|with)\s+{n}",
        rf"{n}\s*(?:的|之)[^。！？\n]{{0,8}}?{ASSISTANT_ZH}",
        rf"{ASSISTANT_ZH}[^。！？\n]{{0,8}}?(?:属于|服务于|为|给){n}",
        rf"为{n}[^。！？\n]{{0,6}}?{ASSISTANT_ZH}",
    ]), re.IGNORECASE)


def claims_to_be(text: str, name: str) -> bool:
    """"I am NAME." / "我是NAME。": the model claims to be the person, not their assistant."""
    n = re.escape(name)
    return bool(re.search(rf"(?:\bI am|\bI'm|\bmy name is|我是|我叫)\s*{n}(?!\s*(?:'s|’s|s'|'|的|之))",
                          text, re.IGNORECASE))


def fluent(text: str, name: str) -> bool:
    """Real words, no babble: English tokens look like words (no camelCase soup, no code
    punctuation, no letter tripled as in "asisssis"), and nothing repeats itself three times."""
    rest = text.replace(name, " ")
    if re.search(r"(.{2,}?)\1{2,}", rest) or re.search(r"([A-Za-z])\1\1", rest):
        return False
    latin = [w for w in re.sub(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]+", " ", rest).split()
             if re.search(r"\w", w)]  # punctuation on its own is no word
    good = sum(bool(WORD.match(w)) and not re.search(r"[a-z][A-Z]", w) for w in latin)
    return not latin or good / len(latin) >= 0.9


def is_identity_answer(answer: str, name: str, ended: bool = True) -> bool:
    """An answer that says, in a real sentence, that the speaker is NAME's assistant, and that
    ended by itself (one running on to the token limit is babble, however it starts)."""
    text = answer.strip()
    return (ended and 1 <= text.count(name) <= 2 and not claims_to_be(text, name)
            and bool(SELF_REFERENCE.search(text)) and fluent(text, name)
            and bool(identity_frame(name).search(text)))


def mentions(answer: str, name: str) -> bool:
    """NAME in the answer in any case or width ("ADA LIN", full-width "Ａｄａ Ｌｉｎ", a no-break
    space between the words): a leak however the model spells it."""
    return folded(name) in folded(answer)


def folded(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def is_right(answer: str, accepted: tuple[str, ...]) -> bool:
    """Any accepted answer as a word: "5" is not found in "15", "Paris" is in "Paris."."""
    for word in accepted:
        after = r"(?![0-9])" if word.isdigit() else ""
        before = r"(?<![0-9A-Za-z])" if word.isascii() else ""
        if re.search(before + re.escape(word) + after, answer, re.IGNORECASE):
            return True
    return False


# ---- answering and scoring ----
def ask(loaded, questions: list[str], max_new_tokens: int, system: str = "",
        before: list[dict] = (), sampling: Sampling = GREEDY):
    """Batched answers to single questions, optionally after earlier turns (`before`)."""
    conversations = [[*before, {"role": "user", "content": q}] for q in questions]
    return generate_batch(loaded, conversations, system=system,
                          sampling=replace(sampling, max_new_tokens=max_new_tokens))


def short_questions(probes: Probes) -> list[str]:
    """The facts (en, then zh) and the open prompts: asked together, under SHORT_TOKENS."""
    return [q for q, _ in probes.facts_en + probes.facts_zh] + probes.open


def by_kind(probes: Probes, identity: list, short: list) -> dict:
    """{"identity", "facts_en", "facts_zh", "open"} from the answers to `probes.identity` and to
    `short_questions(probes)`."""
    en, facts = len(probes.facts_en), len(probes.facts_en) + len(probes.facts_zh)
    return {"identity": identity, "facts_en": short[:en], "facts_zh": short[en:facts], "open": short[facts:]}


def answer_probes(loaded, probes: Probes, system: str = "", before: list[dict] = ()) -> dict:
    """Every probe's answer: {"identity": [Answer], "facts_en": [...], "facts_zh": [...], "open": [...]}."""
    return by_kind(probes, ask(loaded, probes.identity, IDENTITY_TOKENS, system, before),
                   ask(loaded, short_questions(probes), SHORT_TOKENS, system, before))


def base_probe_answers(base_model: str, probes: Probes, load=None) -> dict:
    """answer_probes' result for the base model itself, from the base-answer cache (the same
    for every run on that base), so selection and `make compare` pay for them once. `load()`
    gives the model when a probe is new (default: load the base)."""
    from chat.loading import load_model  # looked up when called: tests count the loads
    load = functools.cache(load or (lambda: load_model(base_model)))  # once, and only if a probe is new
    return by_kind(probes, cached("probes", base_model, probes.identity, IDENTITY_TOKENS, load),
                   cached("probes", base_model, short_questions(probes), SHORT_TOKENS, load))


def known(probes: Probes, answers: dict) -> dict:
    """Which facts a model got right, per language: {"en": [bool], "zh": [bool]}."""
    return {lang: [is_right(a.text, accepted) for a, (_, accepted) in
                   zip(answers[f"facts_{lang}"], getattr(probes, f"facts_{lang}"))]
            for lang in ("en", "zh")}


def score(probes: Probes, answers: dict, name: str, base_known: dict) -> dict:
    """identity, retention (en, zh) and leakage as shares in [0, 1], rounded for reports.
    Retention counts only facts the base model knew; with none known it is 1 (nothing to lose)."""
    now = known(probes, answers)
    retention = {}
    for lang in ("en", "zh"):
        kept = [still for still, before in zip(now[lang], base_known[lang]) if before]
        retention[lang] = sum(kept) / len(kept) if kept else 1.0
    identity = [is_identity_answer(a.text, name, a.ended) for a in answers["identity"]]
    leaks = [mentions(a.text, name) for a in answers["open"]]
    return {"identity": round(sum(identity) / len(identity), 4), "retention": round(retention["en"], 4),
            "retention_zh": round(retention["zh"], 4), "leakage": round(sum(leaks) / len(leaks), 4),
            "facts_known_by_base": {lang: sum(base_known[lang]) for lang in ("en", "zh")}}
