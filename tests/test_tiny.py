"""The tests' tiny model is an InternLM2 with its own (remote) code, as the real base is: its LoRA
targets, merged folders that carry and load that code, the completeness check that requires it,
the plain-Llama case without remote code, and the 1.8B configuration's parameter counts."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from chat import formats
from chat.loading import ModelLoadError, load_model, needs_remote_code
from chat.model_files import model_folder_problems
from conftest import NAME, REPO, read_json
from training import runner, tiny

INTERNLM2_LINEAR = {"wqkv", "wo", "w1", "w2", "w3", "output"}
REMOTE_CODE = ["configuration_internlm2.py", "modeling_internlm2.py"]


@pytest.mark.timeout(120)
def test_tiny_model_is_a_deterministic_internlm2_with_its_own_code(tiny_base, tmp_path):
    config = read_json(tiny_base / "config.json")
    assert config["model_type"] == "internlm2" and config["attn_implementation"] == "eager"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    assert config["hidden_size"] // config["num_attention_heads"] == 32  # vLLM's CPU attention needs >= 32
    assert (config["num_hidden_layers"], config["num_key_value_heads"]) == (2, 2)
    for name in REMOTE_CODE:  # xtuner's copy of InternLM2's code, unchanged
        assert (tiny_base / name).read_bytes() == (tiny.remote_code_dir() / name).read_bytes()
    again = tiny.build(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny_base / "model.safetensors").read_bytes()

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    encoded = tokenizer("Who are you? 你是谁")
    assert set(encoded) == {"input_ids", "attention_mask"}  # token_type_ids would break generate()
    assert encoded["input_ids"][0] == tokenizer.convert_tokens_to_ids("<s>")
    assert read_json(tiny_base / "tokenizer_config.json")["chat_family"] == "internlm2"
    fmt = formats.detect(tokenizer)
    assert fmt.name == "internlm2"
    assert formats.stop_ids(tokenizer, fmt) == tokenizer.convert_tokens_to_ids(["</s>", "<|im_end|>"])


@pytest.mark.timeout(30)
def test_lora_targets_are_internlm2s_linear_layers_including_the_output_head(trained_run):
    adapter = read_json(trained_run / "adapter" / "adapter_config.json")
    assert set(adapter["target_modules"]) == INTERNLM2_LINEAR


@pytest.mark.timeout(300)
def test_merged_model_loads_in_a_fresh_process_from_its_own_folder(merged_model, tmp_path):
    """Only the folder: a copy away from the run, an empty modules cache, no hub."""
    folder = shutil.copytree(merged_model, tmp_path / "model")
    assert set(REMOTE_CODE) <= {p.name for p in folder.glob("*.py")}
    modules = tmp_path / "modules"
    script = ("import sys\n"
              "from chat.generation import Sampling, reply\n"
              "from chat.loading import load_model\n"
              "loaded = load_model(sys.argv[1])\n"
              "print(type(loaded.model).__name__)\n"
              "print(reply(loaded, [{'role': 'user', 'content': 'Who are you?'}], "
              "sampling=Sampling(temperature=0, max_new_tokens=64)))\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(modules), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    model_class, answer = result.stdout.split("\n", 1)
    assert model_class == "InternLM2ForCausalLM"
    assert NAME in answer
    # transformers ran the folder's own modeling code, copied into the fresh modules cache.
    assert list(modules.rglob("modeling_internlm2.py"))


@pytest.mark.timeout(60)
def test_a_merged_folder_without_its_remote_code_is_refused_by_name(merged_model, tmp_path):
    folder = shutil.copytree(merged_model, tmp_path / "model")
    (folder / "modeling_internlm2.py").unlink()
    assert model_folder_problems(folder) == [
        "modeling_internlm2.py is missing: auto_map in config.json names it, and the model cannot "
        "load without its code"]
    with pytest.raises(ModelLoadError, match="modeling_internlm2.py is missing"):
        load_model(str(folder))


@pytest.mark.timeout(30)
def test_merge_step_copies_the_remote_code_from_the_base(tiny_base, merged_model, tmp_path):
    folder = shutil.copytree(merged_model, tmp_path / "model")
    for name in REMOTE_CODE:
        (folder / name).unlink()
    runner.copy_remote_code(str(tiny_base), folder)
    for name in REMOTE_CODE:
        assert (folder / name).read_bytes() == (tiny_base / name).read_bytes()
    assert model_folder_problems(folder) == []


@pytest.mark.timeout(120)
def test_a_plain_llama_base_loads_without_remote_code(tmp_path):
    folder = tiny.build(tmp_path / "llama", llama=True)
    assert not list(folder.glob("*.py")) and not needs_remote_code(folder)
    assert model_folder_problems(folder) == []
    loaded = load_model(str(folder))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.format.name == "internlm2"


@pytest.mark.timeout(180)
def test_1_8b_configuration_parameters_and_its_69m_lora_parameters(tmp_path):
    """InternLM2-Chat-1.8B's shape on the meta device (no weights): the stock recipe's LoRA (r=64)
    on every linear layer xtuner finds, the `output` head included, trains 69.0M parameters."""
    from peft import LoraConfig, get_peft_model
    from xtuner.model.utils import find_all_linear_names

    from training import config

    tokenizer = tiny.build_tokenizer(tiny.CHAT_1_8B["vocab_size"])
    assert len(tokenizer) == 92544
    tiny.write_config(tmp_path, tiny.model_config(tokenizer, tiny.CHAT_1_8B, dtype="bfloat16"))
    model = tiny.random_model(tmp_path, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 1_889_110_016
    targets = find_all_linear_names(model)
    assert set(targets) == INTERNLM2_LINEAR
    lora = config.render("gpu", str(tmp_path), "data.jsonl", tmp_path / "run").model.lora
    lora = LoraConfig(**{key: value for key, value in lora.items() if key != "type"}, target_modules=targets)
    assert lora.r == 64
    trainable = sum(p.numel() for p in get_peft_model(model, lora).parameters() if p.requires_grad)
    assert trainable == 68_968_448  # docs/training.md: 69.0M
