"""Chat formats, one per model family: the only place that knows how a conversation becomes a
prompt. Training (the XTuner template), selection, the CLI, the app, the merged model's
`chat_template` and the serving engine all take it from here, so they agree token for token.

    fmt = detect(tokenizer)                       # from the tokenizer, never the architecture
    prompt = fmt.build_prompt([{"role": "user", "content": "Who are you?"}])
    ids = stop_ids(tokenizer, fmt)

The family comes from the `chat_family` field the kit writes into tokenizer_config.json, else
from the tokenizer's special tokens; TEMPLATE=NAME overrides both.
"""
from dataclasses import dataclass

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    bos: str                         # text in front of every prompt ("" for none)
    stop_tokens: tuple[str, ...]     # generation ends at any of these, by token name
    xtuner_template: dict            # the rendered XTuner config's `prompt_template`
    xtuner_template_without_bos: dict | None = None  # the same, for tokenizers xtuner gives no BOS

    def training_template(self, tokenizer=None) -> dict:
        """The XTuner `prompt_template` for this tokenizer. xtuner's encode_fn puts the
        tokenizer's BOS before each turn, except for Qwen's tokenizer classes (no BOS at all):
        those need every turn's <|im_start|> spelled out."""
        if tokenizer is not None and type(tokenizer).__name__ in XTUNER_NO_BOS:
            if self.xtuner_template_without_bos is None:
                raise UnknownFormat(f"the {self.name} chat format needs a BOS token, which xtuner "
                                    f"gives no {type(tokenizer).__name__}")
            return self.xtuner_template_without_bos
        return self.xtuner_template

    def build_prompt(self, messages: list[dict], system: str = "",
                     add_generation_prompt: bool = True) -> str:
        """Prompt text for [{"role": "user"|"assistant", "content": str}, ...]; with
        `add_generation_prompt` it ends with the assistant header, so the model answers next."""
        return "".join(text for text, _ in self.parts(messages, system, add_generation_prompt))

    def encode(self, tokenizer, messages: list[dict], system: str = "",
               add_generation_prompt: bool = True) -> list[int]:
        """Token ids of build_prompt's text in which only the format's own markers are control
        tokens: what people typed (system, user and assistant content) is tokenized as plain
        text, so a typed `<|im_start|>` or `<s>` stays characters and cannot open a turn. For
        text without such strings the ids are those of tokenizing the whole prompt."""
        ids = []
        for text, control in self.parts(messages, system, add_generation_prompt):
            ids += [tokenizer.convert_tokens_to_ids(text)] if control else \
                tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids

    def parts(self, messages: list[dict], system: str, add_generation_prompt: bool):
        """The prompt as (text, is_control_token) pieces; each text piece lies between two
        control tokens, where a tokenizer splits the whole prompt anyway."""
        parts = [(self.bos, True)] if self.bos else []
        turns = ([{"role": "system", "content": system}] if system else []) + list(messages)
        for m in turns:
            parts += [(IM_START, True), (f"{m['role']}\n{m['content']}", False), (IM_END, True), ("\n", False)]
        return parts + ([(IM_START, True), ("assistant\n", False)] if add_generation_prompt else [])

    @property
    def chat_template(self) -> str:
        """The same format in Jinja, for `apply_chat_template` in any tool (engines included).
        A system message is rendered where it stands, and nothing is injected when there is none."""
        return (
            (f"{{{{ '{self.bos}' }}}}" if self.bos else "")
            + "{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# xtuner 0.2.0 (dataset/utils.py get_bos_eos_token_ids) adds no BOS for these tokenizer classes.
XTUNER_NO_BOS = ("QWenTokenizer", "QWen2Tokenizer", "Qwen2TokenizerFast")
# Every turn written out in full; the answer ends with <|im_end|> (SUFFIX), not the tokenizer's EOS.
SPELLED_OUT = dict(
    SYSTEM=f"{IM_START}system\n{{system}}{IM_END}\n",
    INSTRUCTION=f"{IM_START}user\n{{input}}{IM_END}\n{IM_START}assistant\n",
    SUFFIX=IM_END, SUFFIX_AS_EOS=True, SEP="\n", STOP_WORDS=[IM_END])

FORMATS = {
    # InternLM2-Chat: xtuner's PROMPT_TEMPLATE.internlm2_chat. <s> opens the conversation (xtuner's
    # encode_fn adds it as the BOS token); the answer ends with <|im_end|>, </s> ends a document.
    "internlm2": ChatFormat(
        name="internlm2", bos="<s>", stop_tokens=("</s>", IM_END), xtuner_template=SPELLED_OUT),
    # ChatML without BOS (SmolLM2). xtuner's encode_fn puts the tokenizer's BOS in front of each
    # turn and its EOS after each answer; the kit's ChatML tokenizers name <|im_start|> as BOS and
    # <|im_end|> as EOS, so each turn's template leaves out its opening <|im_start|> (it arrives as
    # the BOS token) and the answer's closing <|im_end|> (it arrives as the EOS token, with loss).
    # Qwen's tokenizers have no BOS (xtuner adds none): every turn is spelled out for them.
    "chatml": ChatFormat(
        name="chatml", bos="", stop_tokens=(IM_END,),
        xtuner_template=dict(
            SYSTEM=f"system\n{{system}}{IM_END}\n{IM_START}",
            INSTRUCTION=f"user\n{{input}}{IM_END}\n{IM_START}assistant\n",
            SEP="\n", STOP_WORDS=[IM_END]),
        xtuner_template_without_bos=SPELLED_OUT),
}


class UnknownFormat(ValueError):
    pass


def detect(tokenizer, override: str = "") -> ChatFormat:
    """The tokenizer's chat format: TEMPLATE override, else the kit's `chat_family` field, else
    its special tokens (InternLM2: <s> BOS and <|im_end|>; ChatML: <|im_start|> BOS)."""
    name = override or tokenizer.init_kwargs.get("chat_family") or family_from_tokens(tokenizer)
    if name not in FORMATS:
        raise UnknownFormat(
            f"unknown chat format {name!r}: supported families are {', '.join(FORMATS)}; a "
            "tokenizer of another family needs TEMPLATE=<family> if it uses one of these formats")
    return FORMATS[name]


def family_from_tokens(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    if IM_START not in vocab or IM_END not in vocab:
        return "(no <|im_start|>/<|im_end|> tokens)"
    if tokenizer.bos_token == "<s>":
        return "internlm2"
    if tokenizer.bos_token in (None, IM_START):
        return "chatml"
    return f"(BOS {tokenizer.bos_token!r})"


def stop_ids(tokenizer, fmt: ChatFormat) -> list[int]:
    """Token ids of the family's stop tokens, resolved by name; a missing one is an error, since
    generation would then run on to the token limit."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in fmt.stop_tokens if token not in vocab]
    if missing:
        raise UnknownFormat(f"the tokenizer has no {', '.join(missing)} token, which the "
                            f"{fmt.name} chat format stops on")
    return [vocab[token] for token in fmt.stop_tokens]
