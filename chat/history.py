"""Fit a conversation into the model's context: the oldest messages are dropped so that the
prompt plus the answer fit, and the caller gets a notice saying what was changed."""
from dataclasses import dataclass, field

from chat.formats import ChatFormat

ROLES = ("user", "assistant")


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

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # Costs come from the one template: a message costs what it adds to an empty prompt.
    fixed = count(fmt.build_prompt([], system))
    empty = count(fmt.build_prompt([]))
    costs = [count(fmt.build_prompt([m])) - empty for m in messages]
    prompt_limit = min(context - 1, max_input_tokens or context)
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
    if start:
        notices.append(f"The {start} oldest message(s) were left out so that the conversation "
                       f"fits the {budget}-token prompt budget.")
    return Fitted(messages[start:], max_new_tokens, notices)
