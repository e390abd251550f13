"""Mixed precision for the CPU recipe. mmengine's AmpOptimWrapper refuses to run without a GPU,
and the LoRA setup xtuner uses (peft's prepare_model_for_kbit_training) casts bf16 weights back
to fp32, so neither the stock AMP path nor a bf16 `torch_dtype` reaches a CPU. This wrapper runs
each training forward under torch's CPU autocast instead: matmuls in bf16, weights, LoRA
parameters, optimizer state and loss in fp32. Only on CPUs with native bf16 (AVX-512 BF16 or
AMX): elsewhere bf16 is emulated and slower than fp32, so training stays fp32.
recipe.toml names it as `optim_wrapper.type`; the runner puts this folder on the xtuner
processes' PYTHONPATH."""
from contextlib import contextmanager, nullcontext

import torch
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper


def native_bf16() -> bool:
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent = no
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


class CPUAutocastOptimWrapper(OptimWrapper):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bf16 = native_bf16()
        print_log(f"CPU training: matmuls in {'bf16 (autocast)' if self.bf16 else 'fp32 (no native bf16)'}",
                  "current")

    @contextmanager
    def optim_context(self, model):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with super().optim_context(model), autocast:
            yield
