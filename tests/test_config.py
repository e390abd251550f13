"""The rendered XTuner config is xtuner's stock recipe plus exactly the overrides we mean."""
import pytest
from mmengine.config import Config

from chat.formats import FORMATS
from conftest import REPO
from training import config

MODEL_PATHS = {f"{where}pretrained_model_name_or_path" for where in (
    "", "model.llm.", "tokenizer.", "alpaca_en.tokenizer.", "train_dataloader.dataset.tokenizer.",
    "custom_hooks.0.tokenizer.", "custom_hooks.1.tokenizer.")}
# Changed in both profiles: our data, our evaluation questions, no system prompt, every
# checkpoint kept, a seed, and where the work dir is.
COMMON = MODEL_PATHS | {
    "SYSTEM", "custom_hooks.1.system", "evaluation_inputs", "custom_hooks.1.evaluation_inputs",
    "evaluation_freq", "custom_hooks.1.every_n_iters", "save_steps", "default_hooks.checkpoint.interval",
    "save_total_limit", "default_hooks.checkpoint.max_keep_ckpts", "randomness.seed",
    "train_dataloader.dataset.dataset.path", "train_dataloader.dataset.dataset.data_files.train",
    "train_dataloader.dataset.dataset_map_fn", "train_dataloader.dataset.map_num_proc", "work_dir",
    "max_length", "alpaca_en.max_length", "train_dataloader.dataset.max_length",
    "accumulative_counts", "optim_wrapper.accumulative_counts",
    "max_epochs", "train_cfg.max_epochs", "param_scheduler.0.end", "param_scheduler.1.begin",
    "param_scheduler.1.end"}
QUANTIZATION = {f"model.llm.quantization_config.{key}" for key in (
    "type", "load_in_4bit", "load_in_8bit", "llm_int8_threshold", "llm_int8_has_fp16_weight",
    "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "bnb_4bit_quant_type")}
# cpu: plain LoRA with fp32 weights, bf16 autocast instead of AMP, no activation checkpointing, a
# larger learning rate, short evaluation samples.
CPU_ONLY = QUANTIZATION | {
    "model.llm.torch_dtype", "model.lora.r", "model.lora.lora_alpha", "model.lora.lora_dropout", "lr",
    "optim_wrapper.optimizer.lr", "optim_wrapper.type", "optim_wrapper.loss_scale", "optim_wrapper.dtype",
    "model.use_activation_checkpointing", "env_cfg.dist_cfg.backend", "custom_hooks.1.max_new_tokens"}


# Where the rendered config holds the chat format: the stock config names xtuner's own template
# there, ours inlines the family's from chat/formats.py (checked below, token for token in
# tests/test_formats.py).
TEMPLATE_PLACES = ("prompt_template", "custom_hooks.1.prompt_template", "alpaca_en.template_map_fn.template",
                   "train_dataloader.dataset.template_map_fn.template")


def flatten(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(node, (list, tuple)) and any(isinstance(item, dict) for item in node):
        return {k: v for i, item in enumerate(node) for k, v in flatten(item, f"{prefix}{i}.").items()}
    return {prefix[:-1]: node}


@pytest.fixture(scope="module")
def stock():
    return flatten(Config.fromfile(config.template_path(config.load_recipe())).to_dict())


def rendered_diff(stock, profile, tmp_path):
    cfg = config.render(profile, "/models/base", "/data/assistant.jsonl", tmp_path / "run")
    config.write(cfg, tmp_path / "run", {})
    rendered = flatten(Config.fromfile(tmp_path / "run" / "config.py").to_dict())  # as xtuner reads it
    missing = object()
    changed = {key for key in stock.keys() | rendered.keys()
               if stock.get(key, missing) != rendered.get(key, missing)
               and not key.startswith(TEMPLATE_PLACES)}
    for place in TEMPLATE_PLACES:
        if place + ".SYSTEM" in rendered or place in stock:
            template = {k[len(place) + 1:]: v for k, v in rendered.items() if k.startswith(place + ".")}
            assert template == FORMATS["internlm2"].xtuner_template, place
    return changed, rendered


def test_gpu_profile_is_the_stock_qlora_recipe_plus_our_overrides(stock, tmp_path):
    changed, rendered = rendered_diff(stock, "gpu", tmp_path)
    assert changed == COMMON
    assert rendered["model.llm.quantization_config.bnb_4bit_quant_type"] == "nf4"
    assert rendered["optim_wrapper.type"] == "mmengine.optim.AmpOptimWrapper"
    assert rendered["model.llm.pretrained_model_name_or_path"] == "/models/base"
    assert rendered["train_dataloader.dataset.dataset.data_files.train"] == "/data/assistant.jsonl"


def test_cpu_profile_changes_only_what_a_cpu_needs(stock, tmp_path):
    changed, rendered = rendered_diff(stock, "cpu", tmp_path)
    # The CPU profile trains 3 epochs, as the stock recipe does: the epoch keys (and the warm-up
    # and cosine bounds derived from them) keep their stock values.
    epochs = {"max_epochs", "train_cfg.max_epochs", "param_scheduler.0.end", "param_scheduler.1.begin",
              "param_scheduler.1.end"}
    # Sample chats only before and after training: the hook's interval is gone, not changed.
    assert changed == (COMMON | CPU_ONLY) - epochs - {"evaluation_freq"}
    assert "custom_hooks.1.every_n_iters" not in rendered
    assert rendered["optim_wrapper.type"] == "cpu_autocast.CPUAutocastOptimWrapper"
    assert rendered["model.use_activation_checkpointing"] is False
    assert not any(key.startswith("model.llm.quantization_config") for key in rendered)


def test_cpu_optim_wrapper_runs_the_forward_in_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch):
    """Built from the rendered config as xtuner builds it (the runner's PYTHONPATH): inside its
    optim_context a matmul runs in bf16 on a CPU with native bf16, and in fp32 on one without."""
    import torch
    from mmengine.registry import OPTIM_WRAPPERS
    monkeypatch.syspath_prepend(str(REPO / "training" / "xtuner_compat"))
    import cpu_autocast
    cfg = config.render("cpu", "/models/base", "/data/assistant.jsonl", tmp_path / "run")
    layer = torch.nn.Linear(8, 8)
    for native in (True, False):
        monkeypatch.setattr(cpu_autocast, "native_bf16", lambda: native)
        wrapper = OPTIM_WRAPPERS.build({**cfg.optim_wrapper, "optimizer": torch.optim.AdamW(layer.parameters())})
        with wrapper.optim_context(layer):
            out = layer(torch.ones(2, 8))
        assert out.dtype == (torch.bfloat16 if native else torch.float32)
        assert layer.weight.dtype == torch.float32  # the weights themselves stay fp32


def test_knobs_override_the_profile(tmp_path):
    cfg = config.render("cpu", "/b", "/d.jsonl", tmp_path, epochs="2", lr="1e-4", save_steps="7")
    assert (cfg.train_cfg.max_epochs, cfg.optim_wrapper.optimizer.lr) == (2, 1e-4)
    assert cfg.default_hooks.checkpoint.interval == 7
    assert "every_n_iters" not in cfg.custom_hooks[1]  # SAVE_STEPS does not bring back the CPU's chats at each save
    gpu = config.render("gpu", "/b", "/d.jsonl", tmp_path, save_steps="7")  # it chats at each save too
    assert gpu.default_hooks.checkpoint.interval == gpu.custom_hooks[1].every_n_iters == 7


def test_a_recipe_setting_the_template_lacks_is_an_error():
    with pytest.raises(ValueError, match="not assigned in the template: \\['max_lenght'\\]"):
        config.replace_settings("max_length = 2048\n", {"max_lenght": 256})


def promised(cfg) -> dict:
    """The settings docs/training.md's profile section promises, read from a rendered config."""
    return {"r": cfg.model.lora.r, "lr": cfg.optim_wrapper.optimizer.lr, "max_length": cfg.max_length,
            "accumulative_counts": cfg.optim_wrapper.accumulative_counts, "epochs": cfg.train_cfg.max_epochs,
            "save_steps": cfg.default_hooks.checkpoint.interval}


def test_gpu_profile_has_the_values_the_docs_promise(tmp_path):
    doc = " ".join((REPO / "docs" / "training.md").read_text(encoding="utf-8").split())
    for promise in ("LoRA r=64", "lr 2e-4", "max_length 512, accumulation 4, 10 epochs, a checkpoint every 40"):
        assert promise in doc, promise
    cfg = config.render("gpu", "/models/base", "/data/assistant.jsonl", tmp_path / "run")
    assert promised(cfg) == {"r": 64, "lr": 2e-4, "max_length": 512, "accumulative_counts": 4, "epochs": 10,
                             "save_steps": 40}
    assert cfg.custom_hooks[1].every_n_iters == 40


def test_cpu_profile_has_the_values_of_its_recipe(tmp_path):
    recipe = config.load_recipe()["cpu"]
    settings, lora_r = recipe["settings"], recipe["set"]["model.lora.r"]
    cfg = config.render("cpu", "/models/base", "/data/assistant.jsonl", tmp_path / "run")
    assert promised(cfg) == {"r": lora_r, "lr": settings["lr"], "max_length": settings["max_length"],
                             "accumulative_counts": settings["accumulative_counts"],
                             "epochs": settings["max_epochs"], "save_steps": settings["save_steps"]}
