"""A model that never stops talking: the tests that must catch a generation in flight (Stop, a
closed tab, a full queue, cancelling) serve it, so the generation they interrupt cannot end on
its own first. A random InternLM2 (remote code, like the tiny model) with the merged model's
tokenizer; its output rows for the stop tokens are zero, so under greedy decoding a stop token
never has the highest logit."""
from pathlib import Path

import torch
from transformers import AutoTokenizer

from chat import formats
from training import tiny

# Bigger than the tiny model, so that each token takes measurable time; head_dim 32.
SIZES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, initializer_range=0.02,
             max_position_embeddings=8192)  # room for max_new_tokens up to the app's slider maximum


def build(tokenizer_from: Path, out_dir: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny.write_config(out_dir, tiny.model_config(tokenizer, SIZES))
    model = tiny.random_model(out_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight[formats.stop_ids(tokenizer, formats.detect(tokenizer))] = 0
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":  # benchmarks serve it too: every answer is exactly max_new_tokens long
    import sys
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
