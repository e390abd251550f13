"""Peak memory of loading a model: chat/loading.py (straight into the target dtype) vs the
tutorial demo's pattern (`from_pretrained` in fp32, then `.half()`/`.to(dtype)`).

Each load runs in a fresh process and reports its own peak RSS; both are measured in this one
run, side by side. The model is a random Llama of ~110M parameters saved in fp16 (the tiny
model is too small for memory to show), built locally."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DTYPE = "bfloat16"  # the target dtype on a GPU; the same saving shows on a CPU

LOADERS = {
    "ours": "from chat.loading import load_model\nload_model(PATH, dtype='%s', device='cpu')" % DTYPE,
    "tutorial": "import torch\nfrom transformers import AutoModelForCausalLM\n"
                "AutoModelForCausalLM.from_pretrained(PATH).to(torch.%s)" % DTYPE,
    "baseline": "import torch, transformers, chat.loading",  # imports only: what both pay anyway
}


def build_model(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training import tiny
    tiny.build(folder)  # tokenizer + chat template of a real merged model
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=1024, torch_dtype="float16")
    torch.manual_seed(0)
    LlamaForCausalLM(config).half().save_pretrained(folder, safe_serialization=True, max_shard_size="200MB")
    (folder / "model.safetensors").unlink(missing_ok=True)


def peak_rss_mb(code: str, path: Path) -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    script = (f"PATH = {str(path)!r}\n{code}\n"
              "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_model(folder)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        rss = {name: peak_rss_mb(code, folder) for name, code in LOADERS.items()}
    ours, tutorial, base = rss["ours"] - rss["baseline"], rss["tutorial"] - rss["baseline"], rss["baseline"]
    print(f"\nmodel loading, {size:.0f} MB of fp16 safetensors -> {DTYPE} (peak RSS above imports, {base:.0f} MB)")
    print(f"  {'chat/loading.py':<28}{ours:8.0f} MB")
    print(f"  {'tutorial (fp32, then cast)':<28}{tutorial:8.0f} MB")
    print(f"  ratio tutorial / ours: {tutorial / ours:.2f}x")


if __name__ == "__main__":
    main()
