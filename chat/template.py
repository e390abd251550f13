"""The one InternLM2 chat format, identical in training, evaluation, the CLI and the app.

xtuner's PROMPT_TEMPLATE.internlm2_chat is the reference (tests compare against it):
    <s><|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{input}<|im_end|>\n
    <|im_start|>assistant\n{output}<|im_end|>\n<|im_start|>user\n...
"""

BOS = "<s>"
EOS = "</s>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Generation ends at either: InternLM2 emits <|im_end|> after an answer, </s> at document end.
STOP_TOKENS = (EOS, IM_END)


def render_turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def build_prompt(messages: list[dict], system: str = "") -> str:
    """Prompt text (BOS included) for `messages` = [{"role": "user"|"assistant", "content": str}],
    ending with the assistant header so the model answers next."""
    text = BOS
    if system:
        text += render_turn("system", system)
    for message in messages:
        text += render_turn(message["role"], message["content"])
    return text + f"{IM_START}assistant\n"


# The same format as a Jinja template, so `tokenizer.apply_chat_template` in any tool formats
# prompts exactly as training did. Written into every merged model's tokenizer_config.json.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
