"""One chat format per model family, identical token for token in training (xtuner's own
template_map_fn + encode_fn on the rendered config), the runtime that selection, the CLI and the
app share, and the merged model's chat_template."""
import runpy

import pytest
from transformers import AutoTokenizer

from chat import formats
from chat.generation import Sampling, stream_reply
from chat.loading import load_model
from conftest import REPO
from training import config

SYSTEM = "You are {name}'s 100% \"helpful\" `assistant`."   # braces and % reach the prompt as typed
CONVERSATION = [{"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "I am Ada Lin's assistant."},
                {"role": "user", "content": "你好 {name} %s"},
                {"role": "assistant", "content": "你好！"}]


@pytest.fixture(scope="module")
def smollm2_base():
    from training.base import default_base
    return default_base()


@pytest.fixture(params=["internlm2", "chatml"])
def family_base(request, tiny_base):
    """(family, base model folder): the tests' tiny InternLM2 and the CPU default SmolLM2."""
    if request.param == "internlm2":
        return "internlm2", tiny_base
    return "chatml", request.getfixturevalue("smollm2_base")


def xtuner_ids(base, family: str, system: str, messages: list[dict]) -> list[int]:
    """What `xtuner train` feeds the model for this conversation, with the config we render."""
    runpy.run_path(str(REPO / "training/xtuner_compat/sitecustomize.py"))  # xtuner on our stack
    from xtuner.dataset.map_fns.template_map_fn import template_map_fn
    from xtuner.dataset.utils import encode_fn

    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=True)
    cfg = config.render("cpu", str(base), "/data.jsonl", "/tmp/run", family=family, tokenizer=tokenizer)
    pairs = zip(messages[::2], messages[1::2])
    record = {"conversation": [{"system": system if i == 0 else "", "input": q["content"],
                                "output": a["content"]} for i, (q, a) in enumerate(pairs)]}
    return encode_fn(template_map_fn(record, cfg.prompt_template), tokenizer, 4096)["input_ids"]


@pytest.mark.timeout(180)
def test_training_runtime_and_chat_template_agree_token_for_token(family_base):
    family, base = family_base
    loaded = load_model(str(base))
    tokenizer, fmt = loaded.tokenizer, loaded.format
    assert fmt.name == family  # recognised from the tokenizer, not the architecture

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    trained = xtuner_ids(base, family, SYSTEM, CONVERSATION)
    whole = ids(fmt.build_prompt(CONVERSATION, SYSTEM, add_generation_prompt=False))
    assert trained == whole
    with_system = [{"role": "system", "content": SYSTEM}] + CONVERSATION
    templated = tokenizer.apply_chat_template(with_system, chat_template=fmt.chat_template)
    assert templated == whole
    # The prompt the runtime sends to generate() for the last question is a prefix of training.
    sent = []
    real_generate = loaded.model.generate
    loaded.model.generate = lambda **kwargs: sent.append(kwargs["input_ids"][0].tolist()) or real_generate(**kwargs)
    for _ in stream_reply(loaded, CONVERSATION[:3], SYSTEM, Sampling(max_new_tokens=2, temperature=0)):
        pass
    prompt = ids(fmt.build_prompt(CONVERSATION[:3], SYSTEM))
    assert sent == [prompt]
    assert trained[:len(prompt)] == prompt
    assert tokenizer.apply_chat_template(with_system[:4], chat_template=fmt.chat_template,
                                         add_generation_prompt=True) == prompt
    # Without the generation header the prompt stops after the last user turn.
    assert fmt.build_prompt(CONVERSATION[:3], SYSTEM, add_generation_prompt=False) + "<|im_start|>assistant\n" \
        == fmt.build_prompt(CONVERSATION[:3], SYSTEM)


def test_each_family_has_its_own_prompt_text():
    messages = CONVERSATION[:1]
    assert formats.FORMATS["internlm2"].build_prompt(messages) == \
        "<s><|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
    assert formats.FORMATS["chatml"].build_prompt(messages) == \
        "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
    assert formats.FORMATS["internlm2"].stop_tokens == ("</s>", "<|im_end|>")
    assert formats.FORMATS["chatml"].stop_tokens == ("<|im_end|>",)


@pytest.mark.timeout(60)
def test_stop_ids_are_resolved_by_name(family_base):
    family, base = family_base
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=True)
    fmt = formats.detect(tokenizer)
    assert formats.stop_ids(tokenizer, fmt) == tokenizer.convert_tokens_to_ids(list(fmt.stop_tokens))
    assert tokenizer.unk_token_id not in formats.stop_ids(tokenizer, fmt)


@pytest.mark.timeout(60)
def test_unknown_family_is_refused_with_the_supported_ones(tmp_path, tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base, trust_remote_code=True)
    tokenizer.init_kwargs["chat_family"] = "llama3"
    with pytest.raises(formats.UnknownFormat, match="internlm2, chatml.*TEMPLATE"):
        formats.detect(tokenizer)
    assert formats.detect(tokenizer, override="chatml").name == "chatml"  # TEMPLATE= wins


@pytest.fixture(scope="module")
def qwen_style(smollm2_base, tmp_path_factory):
    """A ChatML tokenizer without a BOS token, of Qwen's class (bos_token None, <|im_end|> EOS):
    SmolLM2's vocabulary under Qwen2TokenizerFast, saved and loaded back as a user's base would be."""
    from transformers import Qwen2TokenizerFast
    smol = AutoTokenizer.from_pretrained(smollm2_base)
    folder = tmp_path_factory.mktemp("qwen-style")
    Qwen2TokenizerFast(tokenizer_object=smol.backend_tokenizer, bos_token=None, eos_token="<|im_end|>",
                       pad_token="<|endoftext|>", unk_token=None).save_pretrained(folder)
    return folder


@pytest.mark.timeout(120)
def test_a_chatml_tokenizer_without_bos_trains_on_the_prompt_the_runtime_sends(qwen_style):
    tokenizer = AutoTokenizer.from_pretrained(qwen_style)
    assert type(tokenizer).__name__ == "Qwen2TokenizerFast" and tokenizer.bos_token is None
    fmt = formats.detect(tokenizer)
    assert fmt.name == "chatml"  # from its tokens: no chat_family field
    whole = tokenizer(fmt.build_prompt(CONVERSATION, SYSTEM, add_generation_prompt=False),
                      add_special_tokens=False)["input_ids"]
    assert xtuner_ids(qwen_style, "chatml", SYSTEM, CONVERSATION) == whole
    assert tokenizer.decode(whole).count("<|im_start|>") == 5  # every turn opens, none doubled
    assert tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}] + CONVERSATION,
                                         chat_template=fmt.chat_template) == whole
    assert formats.stop_ids(tokenizer, fmt) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.timeout(60)
def test_template_beats_chat_family_which_beats_the_tokens(qwen_style, tiny_base):
    chatml = AutoTokenizer.from_pretrained(qwen_style)
    assert formats.detect(chatml).name == "chatml"
    chatml.init_kwargs["chat_family"] = "internlm2"
    assert formats.detect(chatml).name == "internlm2"                       # the kit's field wins
    assert formats.detect(chatml, override="chatml").name == "chatml"     # TEMPLATE wins over it
    internlm2 = AutoTokenizer.from_pretrained(tiny_base, trust_remote_code=True)
    internlm2.init_kwargs.pop("chat_family")
    assert formats.detect(internlm2).name == "internlm2"                   # <s> BOS + <|im_end|>
    internlm2.init_kwargs["chat_family"] = "chatml"
    assert formats.detect(internlm2).name == "chatml"
    with pytest.raises(formats.UnknownFormat, match="needs a BOS token"):
        formats.FORMATS["internlm2"].training_template(chatml)
