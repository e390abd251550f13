"""The embedded tiny base model: a ~0.5M-parameter Llama with InternLM2's chat tokens and a
character-level tokenizer (byte fallback, so any text encodes). Built locally in seconds,
deterministic from a seed; the default base for CPU runs and every test."""
from pathlib import Path

from chat.template import BOS, CHAT_TEMPLATE, EOS, IM_END, IM_START
from training import data
from training.atomic import atomic_dir

UNK = "<unk>"
SPECIAL_TOKENS = [UNK, BOS, EOS, IM_START, IM_END]  # ids 0..4
DEFAULT_DIR = Path("runs/tiny-base")
SEED = 0

# Architecture measured to learn the identity answers in ~120 LoRA iterations on 2 cores.
HIDDEN = 128
LAYERS = 2
HEADS = 4
INTERMEDIATE = 256
CONTEXT = 1024
INIT_RANGE = 0.2  # large init: a tiny random model needs strong logits to learn quickly


def vocabulary() -> list[str]:
    """Special tokens, 256 byte tokens, printable ASCII, and every character our own prompt and
    answer texts use (anything else, e.g. an unusual NAME, goes through the byte tokens)."""
    from training import replay  # the shipped general prompts

    texts = (data.TRAIN_QUESTIONS + data.HELD_OUT_QUESTIONS + data.ANSWERS_ZH + data.ANSWERS_EN
             + replay.PROMPTS + replay.HELD_OUT_PROMPTS + [data.DEFAULT_NAME])
    chars = {chr(c) for c in range(32, 127)} | {"\n"} | set("".join(texts))
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    return SPECIAL_TOKENS + byte_tokens + sorted(chars - set("{}"))


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, byte_fallback=True))
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    # Like InternLM2, `tokenizer(text)` prepends <s>; add_special_tokens=False does not.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False)


def build(out_dir: str | Path = DEFAULT_DIR) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        max_position_embeddings=CONTEXT, initializer_range=INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id,
                                            tokenizer.convert_tokens_to_ids(IM_END)]
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    print(f"tiny base model: {params / 1e6:.2f}M parameters, vocab {len(tokenizer)} -> {out_dir}")
    return out_dir
