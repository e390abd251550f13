"""Narrow fixes for xtuner 0.2.0 on our pinned stack. The runner puts this folder on PYTHONPATH
for the processes the xtuner CLI starts (and nothing else); installed packages are never edited.
Each fix applies only where its problem exists, so a GPU machine runs xtuner untouched."""
import importlib.util
import sys
import types


def _cpu_bf16_probe():
    # xtuner asks `torch.<device>.is_bf16_supported()`; on a CPU-only machine the device is
    # "cpu" and torch.cpu has no such function, so every model build crashes. We train in fp32
    # there, so "not supported" is the true answer for our purposes.
    import torch
    if not hasattr(torch.cpu, "is_bf16_supported"):
        torch.cpu.is_bf16_supported = lambda *args, **kwargs: False


def _internvl_without_torchvision():
    # xtuner.dataset imports its InternVL (vision) dataset, which needs torchvision, at package
    # import. We do not install torchvision: PyPI's build does not load beside the CPU torch
    # wheel, and text-only fine-tuning never uses it. Stand in for that one module only.
    if importlib.util.find_spec("torchvision") is not None:
        return
    stub = types.ModuleType("xtuner.dataset.internvl_dataset")

    class InternVL_V1_5_Dataset:  # noqa: N801 - xtuner's name
        def __init__(self, *args, **kwargs):
            raise ImportError("InternVL datasets need torchvision, which this kit does not install")

    stub.InternVL_V1_5_Dataset = InternVL_V1_5_Dataset
    sys.modules.setdefault(stub.__name__, stub)


_cpu_bf16_probe()
_internvl_without_torchvision()
