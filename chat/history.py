"""Fit a conversation into the model's context: the oldest messages are dropped so that the
prompt plus the answer fit, and the caller gets a notice saying what was changed. Sizes are
checked in characters before anything is tokenized, so a huge message costs no tokenizing."""
from dataclasses import dataclass, field

from chat.formats import ChatFormat

ROLES = ("user", "assistant")
# No token of the supported tokenizers spans more characters than this (English averages ~4), so
# text longer than CHARS_PER_TOKEN * a token budget cannot fit it: refused or dropped untokenized.
CHARS_PER_TOKEN = 10


def char_limit(max_input_tokens: int) -> int:
    """The most characters a message may have for a prompt budget of `max_input_tokens`."""
    return CHARS_PER_TOKEN * max_input_tokens


def check_size(text: str, max_input_tokens: int) -> None:
    """Refuse, before any tokenizing, a message that cannot fit `max_input_tokens`."""
    if len(text) > char_limit(max_input_tokens):
        raise ValueError(f"Your message is {len(text):,} characters long; the limit is "
                         f"{char_limit(max_input_tokens):,} ({max_input_tokens} tokens, "
                         "MAX_INPUT_TOKENS). Please shorten it.")


def check_sizes(question: str, system: str, max_input_tokens: int) -> None:
    """The new message and the system prompt must each fit: the two that are never dropped."""
    check_size(question, max_input_tokens)
    check_size(system, max_input_tokens)


@dataclass
class Fitted:
    messages: list[dict]
    max_new_tokens: int
    notices: list[str] = field(default_factory=list)


def check_messages(messages: list[dict]) -> list[dict]:
    """Messages are user and assistant turns ending with the non-empty user message to answer;
    the system prompt travels separately."""
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': 'user' | 'assistant', 'content': str}}, "
                             f"got {message!r:.200}")
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user message to answer")
    if not messages[-1]["content"].strip():
        raise ValueError("Your message is empty: type a question first.")
    return messages


def fit(tokenizer, fmt: ChatFormat, messages: list[dict], system: str, max_new_tokens: int,
        context: int, max_input_tokens: int | None = None) -> Fitted:
    """Drop the oldest messages until the prompt fits `max_input_tokens` (when set) and prompt +
    `max_new_tokens` fit `context`; lower `max_new_tokens` if even the last message alone leaves
    less room than that."""
    messages = check_messages(messages)
    prompt_limit = min(context - 1, max_input_tokens or context)
    check_sizes(messages[-1]["content"], system, prompt_limit)
    dropped = drop_by_characters(messages, char_limit(prompt_limit))
    messages = messages[dropped:]

    def count(messages: list[dict], system: str = "") -> int:
        return len(fmt.encode(tokenizer, messages, system))

    # Costs come from the one template: a message costs what it adds to an empty prompt.
    fixed = count([], system)
    empty = count([])
    costs = [count([m]) - empty for m in messages]
    if fixed + costs[-1] > prompt_limit:
        raise ValueError(f"Your message is {costs[-1]} tokens long; the limit is "
                         f"{max(prompt_limit - fixed, 0)} tokens (the model's context or "
                         "MAX_INPUT_TOKENS, minus the system prompt). Please shorten it.")
    notices = []
    room = context - fixed - costs[-1]
    if max_new_tokens > room:
        notices.append(f"max_new_tokens lowered from {max_new_tokens} to {room}: the prompt and "
                       f"the answer must fit the model's {context}-token context.")
        max_new_tokens = room
    budget = min(prompt_limit, context - max_new_tokens)
    start, total = 0, fixed + sum(costs)
    # Drop from the front; never start the kept history with an answer to a dropped question.
    while total > budget or messages[start]["role"] != "user":
        total -= costs[start]
        start += 1
    if start + dropped:
        notices.append(f"The {start + dropped} oldest message(s) were left out so that the "
                       f"conversation fits the {budget}-token prompt budget.")
    return Fitted(messages[start:], max_new_tokens, notices)


def drop_by_characters(messages: list[dict], limit: int) -> int:
    """How many of the oldest messages cannot fit `limit` characters with those after them:
    they would be dropped after tokenizing anyway, so they are never tokenized."""
    total, keep = 0, 0
    for message in reversed(messages):
        total += len(message["content"])
        if total > limit:
            break
        keep += 1
    return len(messages) - max(keep, 1)
