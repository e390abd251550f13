"""The CPU default base model: SmolLM2-135M-Instruct converted from its wheel's GGUF file
(training/base.py). Uses the user's converted copy in the cache dir, converting it (~1 min) when
missing, as `make base` does."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chat.formats import FORMATS, detect
from training import base
from training.tiny import CHAT_1_8B

REPO = Path(__file__).resolve().parent.parent
CONVERT_TIMEOUT_S = 600   # ~1 min alone, several on a busy 2-core machine
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def make_base() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.base"], cwd=REPO, capture_output=True,
                          text=True, timeout=CONVERT_TIMEOUT_S)


@pytest.fixture(scope="session")
def smollm2_base():
    result = make_base()
    assert result.returncode == 0, result.stdout + result.stderr
    assert base.is_current(base.default_dir())
    return base.default_dir()


@pytest.fixture(scope="module")
def tokenizer(smollm2_base):
    return AutoTokenizer.from_pretrained(smollm2_base)


@pytest.mark.timeout(CONVERT_TIMEOUT_S + 60)
def test_folder_is_plain_readable_and_stamped(smollm2_base):
    names = {path.name for path in smollm2_base.iterdir()}
    assert "tokenizer.model" not in names, "the 98 MB copy of the GGUF must not be saved"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", base.STAMP} <= names
    umask = os.umask(0)
    os.umask(umask)
    for path in smollm2_base.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, f"{path.name}: not the umask's mode"
    tokenizer_config = json.loads((smollm2_base / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loads in transformers 5 (vLLM)
    assert tokenizer_config["chat_family"] == "chatml"
    for name in ("config.json", "generation_config.json"):
        config = json.loads((smollm2_base / name).read_text())
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2), name
    stamp = json.loads((smollm2_base / base.STAMP).read_text())
    assert (stamp["parameters"], stamp["dtype"]) == (base.PARAMS, "float32")


@pytest.mark.timeout(CONVERT_TIMEOUT_S + 60)
def test_tokenizer_adds_nothing_and_ends_answers_with_im_end(tokenizer):
    encoded = tokenizer("hello")
    assert list(encoded) == ["input_ids", "attention_mask"]
    assert tokenizer.bos_token_id not in encoded.input_ids and encoded.input_ids == [28120]
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)
    fmt = detect(tokenizer)
    assert fmt is FORMATS["chatml"]
    # No hidden "You are ... SmolLM" system prompt: the saved template is the kit's format.
    assert tokenizer.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True) \
        == fmt.build_prompt(FRANCE) \
        == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    text = "Ada Lin's 助手 O'Brien \"Bob\" `x` $HOME 🙂"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


@pytest.mark.timeout(CONVERT_TIMEOUT_S + 300)
def test_model_answers_and_stops_at_im_end(smollm2_base, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(smollm2_base)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == base.PARAMS == base.check_cpu_size(smollm2_base, force=False)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    prompt = tokenizer(FORMATS["chatml"].build_prompt(FRANCE), return_tensors="pt")
    limit = 48
    out = model.generate(**prompt, max_new_tokens=limit, do_sample=False)[0, prompt.input_ids.shape[1]:]
    answer = tokenizer.decode(out)
    assert "Paris" in answer
    assert out[-1] == tokenizer.eos_token_id and len(out) < limit // 2, f"did not stop: {answer!r}"


@pytest.mark.timeout(CONVERT_TIMEOUT_S + 60)
def test_converted_once(smollm2_base):
    started = time.perf_counter()
    result = make_base()
    assert result.returncode == 0 and "converting" not in result.stdout, result.stdout
    assert f"ready: {smollm2_base}" in result.stdout
    assert time.perf_counter() - started < 60  # an import, not a conversion


@pytest.mark.timeout(30)
def test_a_stamp_from_another_version_means_rebuild(tmp_path):
    assert not base.is_current(tmp_path)
    (tmp_path / base.STAMP).write_text(json.dumps({**base.fingerprint(), "version": base.VERSION - 1}))
    assert not base.is_current(tmp_path)
    (tmp_path / base.STAMP).write_text(json.dumps({**base.fingerprint(), "seconds": 61.0}))
    assert base.is_current(tmp_path)


@pytest.mark.timeout(30)
def test_cpu_profile_refuses_a_base_over_1b_unless_forced(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internlm2", **CHAT_1_8B}))
    with pytest.raises(ValueError, match=r"1\.9B parameters.*hours.*PROFILE=gpu.*FORCE=1"):
        base.check_cpu_size(tmp_path, force=False)
    assert base.check_cpu_size(tmp_path, force=True) == 1_889_110_016  # InternLM2-Chat-1.8B's count
    assert base.check_cpu_size({"hidden_size": 2048}, force=True) is None
    with pytest.raises(ValueError, match="FORCE=1"):
        base.check_cpu_size({"hidden_size": 2048}, force=False)
