"""Peak memory of loading a model: chat/loading.py (straight into the target dtype) vs the
tutorial demo's pattern (`from_pretrained` in fp32, then `.half()`/`.to(dtype)`).

Each load runs in a fresh process and reports its own peak RSS; both are measured in this one
run, side by side. The model is the CPU default base, SmolLM2-135M-Instruct (fp32 safetensors,
converted once from its wheel by `make base`)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DTYPE = "bfloat16"  # the target dtype on a GPU; the same saving shows on a CPU

LOADERS = {
    "ours": "from chat.loading import load_model\nload_model(PATH, dtype='%s', device='cpu')" % DTYPE,
    "tutorial": "import torch\nfrom transformers import AutoModelForCausalLM\n"
                "AutoModelForCausalLM.from_pretrained(PATH).to(torch.%s)" % DTYPE,
    "baseline": "import torch, transformers, chat.loading",  # imports only: what both pay anyway
}


def peak_rss_mb(code: str, path: Path) -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    script = (f"PATH = {str(path)!r}\n{code}\n"
              "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    from training.base import default_base
    folder = default_base()
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
    rss = {name: peak_rss_mb(code, folder) for name, code in LOADERS.items()}
    ours, tutorial, base = rss["ours"] - rss["baseline"], rss["tutorial"] - rss["baseline"], rss["baseline"]
    print(f"\nmodel loading, {folder.name}: {size:.0f} MB of fp32 safetensors -> {DTYPE} "
          f"(peak RSS above imports, {base:.0f} MB)")
    print(f"  {'chat/loading.py':<28}{ours:8.0f} MB")
    print(f"  {'tutorial (fp32, then cast)':<28}{tutorial:8.0f} MB")
    print(f"  ratio tutorial / ours: {tutorial / ours:.2f}x")


if __name__ == "__main__":
    main()
