"""`make gpu-check` without a GPU (this machine): it stops at once, naming what is missing, and
installs nothing. With a GPU it runs a plan of steps; the plan is data, so its exact commands,
the GPU recipe they render and the figures read from their logs are checked here."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mmengine.config import Config

from conftest import REPO
from training import gpu_check, knobs, runner, tiny
from training.gpu_check import Step

PY = ("python", "-m", "training")
CHECK = ("python", "-m", "training.gpu_check")
W = "runs/gpu-check"
QLORA_STEPS = [
    ("build model", (*CHECK, "build", f"{W}/base")),
    ("data", (*PY, "data", "--run", f"{W}/qlora", "--name", "GPU Check", "--data", f"{W}/data.jsonl",
              "--data-size", "200", "--replay", "0")),
    ("config (QLoRA)", (*PY, "config", "--run", f"{W}/qlora", "--profile", "gpu", "--base-model", f"{W}/base",
                        "--data", f"{W}/data.jsonl", "--epochs", "1", "--save-steps", "1000")),
    ("short eval (QLoRA)", (*CHECK, "short-eval", f"{W}/qlora/config.py")),
    ("train (QLoRA)", (*PY, "fit", "--run", f"{W}/qlora")),
    ("convert (QLoRA)", (*PY, "convert", "--run", f"{W}/qlora")),
    ("merge", (*PY, "merge", "--run", f"{W}/qlora")),
    ("stream", (*CHECK, "stream", f"{W}/qlora/merged")),
]
ZERO2_STEPS = [
    ("config (ZeRO-2)", (*PY, "config", "--run", f"{W}/zero2", "--profile", "gpu", "--base-model", f"{W}/base",
                         "--data", f"{W}/data.jsonl", "--epochs", "1", "--save-steps", "1000",
                         "--deepspeed", "deepspeed_zero2")),
    ("short eval (ZeRO-2)", (*CHECK, "short-eval", f"{W}/zero2/config.py")),
    ("train (ZeRO-2)", (*PY, "fit", "--run", f"{W}/zero2", "--deepspeed", "deepspeed_zero2")),
    ("convert (ZeRO-2)", (*PY, "convert", "--run", f"{W}/zero2")),
]
IMAGE_STEPS = [
    ("image build", ("make", "image", "IMAGE=assistant-kit-gpu-check")),
    ("image run", (*CHECK, "serve-image", f"{W}/qlora/merged")),
]


def fake_bin(tmp_path: Path, nvidia_smi: str | None) -> Path:
    """A PATH with make and a plain python3 (no venv) and, optionally, an nvidia-smi script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "make").symlink_to(shutil.which("make"))
    (bin_dir / "python3").symlink_to(Path(sys.base_prefix) / "bin" / "python3")
    if nvidia_smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    return bin_dir


@pytest.mark.timeout(60)
@pytest.mark.parametrize("nvidia_smi, reason", [
    (None, "nvidia-smi is not installed"),
    ("echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit 9",
     "nvidia-smi finds no GPU (NVIDIA-SMI has failed because it couldn't communicate"),
])
def test_make_gpu_check_without_a_gpu_stops_at_once_and_installs_nothing(tmp_path, nvidia_smi, reason):
    venv = tmp_path / "venv"
    env = {**os.environ, "PATH": str(fake_bin(tmp_path, nvidia_smi))}
    started = time.monotonic()
    result = subprocess.run(["make", "--no-print-directory", "gpu-check", f"VENV={venv}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=50)
    assert time.monotonic() - started < 15
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("gpu-check:")]
    assert len(said) == 1 and said[0].startswith("gpu-check: no NVIDIA GPU on this machine: " + reason)
    assert "Traceback" not in result.stdout + result.stderr
    assert not venv.exists()  # nothing was installed


@pytest.mark.timeout(10)
def test_the_plan_of_each_mode_is_exactly_these_commands(monkeypatch):
    def plan(mode):
        return [(step.name, step.argv) for step in gpu_check.plan(mode)]

    assert plan("quick") == QLORA_STEPS
    assert plan("standard") == QLORA_STEPS + ZERO2_STEPS
    assert plan("full") == QLORA_STEPS + ZERO2_STEPS + IMAGE_STEPS
    for env, mode in [({}, "standard"), ({"QUICK": "1"}, "quick"), ({"QUICK": "0"}, "standard"),
                      ({"FULL": "1"}, "full"), ({"QUICK": "1", "FULL": "1"}, "full")]:
        for knob in ("QUICK", "FULL"):
            monkeypatch.delenv(knob, raising=False)
        for knob, value in env.items():
            monkeypatch.setenv(knob, value)
        assert gpu_check.mode_from_env() == mode


@pytest.mark.timeout(300)
def test_the_plans_first_steps_render_the_gpu_recipe_gpu_check_relies_on(tmp_path):
    """Runs the plan's data, config and short-eval commands as they are (no GPU needed for them)
    against the 1.8B configuration without weights, and checks what training will get."""
    work = tmp_path / "gpu-check"
    base = work / "base"
    base.mkdir(parents=True)
    tokenizer = tiny.build_tokenizer(tiny.CHAT_1_8B["vocab_size"])
    tokenizer.save_pretrained(base)
    tiny.write_config(base, tiny.model_config(tokenizer, tiny.CHAT_1_8B, dtype="bfloat16"))
    steps = {step.name: step for step in gpu_check.plan("quick", sys.executable, work)}
    env = {key: value for key, value in os.environ.items() if key not in ("NAME", "RUN", "DATA")}
    for name in ("data", "config (QLoRA)", "short eval (QLoRA)"):
        result = subprocess.run(steps[name].argv, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"},
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, f"{name}: {result.stdout[-2000:]}{result.stderr[-2000:]}"

    run = work / "qlora"
    cfg = Config.fromfile(str(run / "config.py"))
    llm = cfg.model.llm
    assert llm.pretrained_model_name_or_path == str(base.resolve())
    quant = llm.quantization_config
    assert (quant.load_in_4bit, quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert "float16" in str(quant.bnb_4bit_compute_dtype) and "float16" in str(llm.torch_dtype)
    assert "AmpOptimWrapper" in str(cfg.optim_wrapper.type)
    assert (cfg.optim_wrapper.dtype, cfg.optim_wrapper.loss_scale) == ("float16", "dynamic")
    assert (cfg.model.lora.r, cfg.max_length, cfg.train_dataloader.batch_size) == (64, 512, 1)
    assert cfg.train_cfg.max_epochs == 1 and cfg.default_hooks.checkpoint.interval == 1000
    evaluation = [hook for hook in cfg.custom_hooks if "evaluation_inputs" in hook]
    assert [hook["max_new_tokens"] for hook in evaluation] == [gpu_check.EVAL_TOKENS]
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert (info["profile"], info["quantization"], info["name"]) == ("gpu", "4-bit NF4 (QLoRA)", gpu_check.NAME)

    # The figures the table shows for a training step come from mmengine's iteration lines.
    (run / "logs").mkdir(exist_ok=True)
    (run / "logs" / "fit.log").write_text(
        "Iter(train) [10/40]  lr: 1e-4  eta: 0:00:30  time: 0.9000  data_time: 0.01  memory: 4096  loss: 9.1\n"
        "Iter(train) [20/40]  lr: 2e-4  eta: 0:00:20  time: 0.5000  data_time: 0.01  memory: 5120  loss: 8.2\n"
        "Iter(train) [30/40]  lr: 2e-4  eta: 0:00:10  time: 0.2560  data_time: 0.01  memory: 5632  loss: 7.3\n")
    assert gpu_check.training_figures(run) == {"tokens_per_s": round(512 / 0.378), "peak_gib": 5.5}


@pytest.mark.timeout(30)
def test_deepspeed_reaches_xtuner_train(monkeypatch, tmp_path):
    assert "deepspeed_zero2" in knobs.DEEPSPEED_CONFIGS  # xtuner ships the config the plan names (test_make checks)
    calls = []
    monkeypatch.setattr(runner, "check_deepspeed", lambda name: None)  # DeepSpeed is not installed here
    monkeypatch.setattr(runner, "xtuner", lambda args, log, step, deepspeed: calls.append((args, deepspeed)) or [])
    with pytest.raises(runner.StepFailed, match="wrote no checkpoint"):
        runner.fit(tmp_path, "", "deepspeed_zero2")
    assert calls == [(["train", str(tmp_path / "config.py"), "--work-dir", str(tmp_path / "work"),
                       "--deepspeed", "deepspeed_zero2"], True)]
    # One process: DeepSpeed finds its rank in torchrun's variables, not through MPI (xtuner#592).
    for name in ("RANK", "WORLD_SIZE", "NPROC_PER_NODE", "NNODES"):
        monkeypatch.delenv(name, raising=False)
    env = runner.xtuner_env(deepspeed=True)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "0", "1", "127.0.0.1")
    assert "RANK" not in runner.xtuner_env(deepspeed=False)
    monkeypatch.setenv("NPROC_PER_NODE", "8")  # torchrun's own launch sets them itself
    assert "RANK" not in runner.xtuner_env(deepspeed=True)


@pytest.mark.timeout(10)
def test_torch_cuda_version_is_matched_against_the_bitsandbytes_builds():
    libs = gpu_check.bitsandbytes_cuda_libs()
    assert "libbitsandbytes_cuda124.so" in libs  # the installed wheel ships one library per CUDA version
    assert gpu_check.cuda_report("12.4", libs) == (
        True, f"torch CUDA 12.4; bitsandbytes ships libbitsandbytes_cuda124.so (of {len(libs)} CUDA builds)")
    ok, report = gpu_check.cuda_report("13.0", libs)
    assert not ok and report.startswith("torch CUDA 13.0, but bitsandbytes has no libbitsandbytes_cuda130.so")
    assert "BNB_CUDA_VERSION" in report
    assert gpu_check.cuda_report(None, libs)[0] is False


@pytest.mark.timeout(60)
def test_a_failed_step_is_reported_with_its_reason_and_skips_what_needs_it(tmp_path):
    steps = [Step("measure", (sys.executable, "-c", "print('RESULT {\"tokens_per_s\": 42}')")),
             Step("break", (sys.executable, "-c", "import sys; sys.exit('error: the thing broke')")),
             Step("after", (sys.executable, "-c", "pass"), ("break",))]
    rows = gpu_check.run_steps(steps, tmp_path)
    assert [(row["step"], row["result"]) for row in rows] == [
        ("measure", "pass"), ("break", "FAIL"), ("after", "skipped")]
    assert rows[0]["tokens_per_s"] == 42
    assert rows[1]["reason"].startswith("error: the thing broke (log: ")
    assert rows[2]["reason"] == "break did not pass"
    table = gpu_check.table(rows).splitlines()
    assert table[1].split()[:2] == ["measure", "pass"] and "tokens_per_s 42" in table[1]
    assert "FAIL" in table[2] and "error: the thing broke" in table[2]


@pytest.mark.timeout(240)
def test_the_stream_step_measures_the_merged_model(merged_model, tmp_path):
    """The step that loads and streams as the app does, here on the CPU and the tiny model."""
    step = Step("stream", (sys.executable, "-m", "training.gpu_check", "stream", str(merged_model)))
    [row] = gpu_check.run_steps([step], tmp_path)
    assert row["result"] == "pass", row
    assert (row["device"], row["dtype"]) == ("cpu", "float32")
    assert 0 < row["tokens"] <= gpu_check.STREAM_TOKENS and row["tokens_per_s"] > 0

