"""A model that never stops talking: the tests that must catch a generation in flight (Stop, a
closed tab, a full queue, cancelling) serve it, so the generation they interrupt cannot end on
its own first. A real Llama with the merged model's tokenizer; its output rows for the stop
tokens are zero, so under greedy decoding a stop token never has the highest logit."""
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from chat.loading import stop_ids

CONTEXT = 8192  # room for max_new_tokens up to the app's slider maximum


def build(tokenizer_from: Path, out_dir: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=CONTEXT, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[stop_ids(tokenizer)] = 0
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":  # benchmarks serve it too: every answer is exactly max_new_tokens long
    import sys
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
