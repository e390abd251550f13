"""Random InternLM2 models built locally, with no download: the tests' tiny one (~0.5M parameters,
`make tiny`) and, for `make gpu-check`, one of InternLM2-Chat-1.8B's exact shape. Both run the
modeling code xtuner 0.2.0 ships for InternLM2, copied into the folder and named by `auto_map`,
so everything loads them through `trust_remote_code` as it loads the real model. The tokenizer is
character-level with byte fallback (any text encodes) and carries InternLM2's chat tokens.
Deterministic from a seed. `llama=True` builds the same tiny model as a plain Llama instead: the
case of a base that transformers knows natively (no remote code)."""
import importlib.util
import json
import shutil
from pathlib import Path

from chat.formats import FORMATS, IM_END, IM_START
from chat.model_files import remote_code_files
from training import data
from training.atomic import atomic_dir

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [UNK, BOS, EOS, IM_START, IM_END]  # ids 0..4
CHAT_FAMILY = "internlm2"
DEFAULT_DIR = Path("runs/tiny-base")
SEED = 0
REMOTE_CODE = {"AutoConfig": "configuration_internlm2.InternLM2Config",
               "AutoModel": "modeling_internlm2.InternLM2Model",
               "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}

# Measured to learn the identity answers within the CPU profile's iterations on 2 cores.
# head_dim = 128 / 4 = 32: vLLM's CPU attention rejects 16.
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024,
            initializer_range=0.2)  # large init: a tiny random model needs strong logits to learn quickly
# How the tests train it (the CPU profile's own settings are SmolLM2's): a random model needs a
# large step and several epochs, ~730 iterations on the default 400 records. Measured with these,
# its loss falls as fast as the former tiny Llama's and it answers the trained questions with NAME.
# Its 1.7 MB merge into several shards, the path every real model takes.
TRAINING = {"lr": "3e-3", "epochs": "6", "save-steps": "100", "shard-size": "400KB"}
# internlm/internlm2-chat-1_8b's config.json (1,889,110,016 parameters).
CHAT_1_8B = dict(vocab_size=92544, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=32768,
                 rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0},
                 rms_norm_eps=1e-5, initializer_range=0.02)


def remote_code_dir() -> Path:
    """xtuner's copy of InternLM2's configuration_/modeling_internlm2.py (found without importing
    xtuner, which is slow to import)."""
    spec = importlib.util.find_spec("xtuner")
    if spec is None:
        raise ValueError("xtuner is not installed: run `make setup`")
    return Path(spec.submodule_search_locations[0]) / "_lite" / "modelings" / "internlm2"


def vocabulary() -> list[str]:
    """Special tokens, 256 byte tokens, printable ASCII, and every character our own prompt and
    answer texts use (anything else, e.g. an unusual NAME, goes through the byte tokens). Only
    the everyday replay prompts: the seeded init, and so the tests' measured schedule, depends on
    the vocabulary, and the science prompts' few new characters have byte tokens anyway."""
    from training import replay  # the shipped general prompts

    texts = (data.TRAIN_QUESTIONS + data.SELECTION_QUESTIONS + data.ACCEPTANCE_QUESTIONS
             + data.ANSWERS_ZH + data.ANSWERS_EN + replay.EVERYDAY + [data.DEFAULT_NAME])
    chars = {chr(c) for c in range(32, 127)} | {"\n"} | set("".join(texts))
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    return SPECIAL_TOKENS + byte_tokens + sorted(chars - set("{}"))


def build_tokenizer(vocab_size: int | None = None):
    """`vocab_size` pads the vocabulary with unused tokens to a real model's size, so every id a
    random model of that size can emit decodes."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    tokens = vocabulary()
    tokens += [f"<|unused_{i}|>" for i in range(len(tokens), vocab_size or len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, byte_fallback=True))
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    # Like InternLM2, `tokenizer(text)` prepends <s>; add_special_tokens=False does not.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END], chat_template=FORMATS[CHAT_FAMILY].chat_template,
        chat_family=CHAT_FAMILY,  # saved into tokenizer_config.json, where chat/formats.py reads it
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False)


def model_config(tokenizer, sizes: dict = TINY, llama: bool = False, dtype: str = "float32") -> dict:
    common = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, hidden_act="silu", tie_word_embeddings=False,
                  torch_dtype=dtype, **{**sizes, "vocab_size": len(tokenizer)})
    if llama:
        return dict(common, model_type="llama", architectures=["LlamaForCausalLM"])
    return dict(common, model_type="internlm2", architectures=["InternLM2ForCausalLM"],
                auto_map=REMOTE_CODE, bias=False, attn_implementation="eager")


def write_config(folder: Path, config: dict) -> None:
    """config.json, plus the remote code its auto_map names."""
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in sorted({ref.split(".")[0] + ".py" for ref in config.get("auto_map", {}).values()}):
        shutil.copy(remote_code_dir() / name, folder / name)


def random_model(folder: Path, device: str = "cpu"):
    """A seeded random model of the folder's config, from the folder's own code (as any user of
    the real model gets it); device "meta" allocates nothing."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    remote = bool(remote_code_files(folder))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
    torch.manual_seed(SEED)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=remote,
                                                torch_dtype=config.torch_dtype)


def build(out_dir: str | Path = DEFAULT_DIR, sizes: dict = TINY, llama: bool = False,
          device: str = "cpu", dtype: str = "float32", tokenizer=None) -> Path:
    """`tokenizer` (default: build_tokenizer's character-level one) is saved with the model, whose
    vocabulary, BOS/EOS/pad ids and stop ids come from it: tests/test_gguf.py gives a SentencePiece
    one, the kind of tokenizer.model llama.cpp's InternLM2 converter reads."""
    out_dir = Path(out_dir)
    if tokenizer is None:
        tokenizer = build_tokenizer(sizes.get("vocab_size"))
    with atomic_dir(out_dir) as tmp:
        write_config(tmp, model_config(tokenizer, sizes, llama, dtype))
        model = random_model(tmp, device)
        model.generation_config.eos_token_id = [tokenizer.eos_token_id,
                                                tokenizer.convert_tokens_to_ids(IM_END)]
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
    kind = "Llama" if llama else "InternLM2"
    print(f"random {kind}: {params:,} parameters, vocab {len(tokenizer)} -> {out_dir}")
    return out_dir
