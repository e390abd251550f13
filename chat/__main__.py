"""Terminal chat on the same runtime as the app: `python -m chat [MODEL_ID]` (`make chat`).
Settings come from the app's environment variables; sampling from the flags below.
Ctrl-C stops an answer, /clear starts a new conversation, /exit or Ctrl-D quits."""
import argparse
import os
import sys
from contextlib import closing
from dataclasses import fields

from chat.generation import Sampling, stream_reply
from chat.loading import ModelLoadError
from chat.settings import Settings, SettingsError


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_id", nargs="?", default=os.environ.get("MODEL_ID", ""),
                        help="model folder, hub repo id or OpenXLab repo (default: $MODEL_ID)")
    for f in fields(Sampling):
        kind = int if f.type == int | None else f.type  # seed: argparse needs a callable, not a union
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sampling = Sampling(**{f.name: getattr(args, f.name) for f in fields(Sampling)})
        settings = Settings.from_env({**os.environ, "MODEL_ID": args.model_id})
        print(f"loading {settings.model_id} ...", file=sys.stderr)
        loaded = settings.load()
    except (SettingsError, ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{loaded.model_id} on {loaded.device} ({loaded.dtype}). Ctrl-C stops an answer, "
          "/clear starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    messages = []
    while True:
        try:
            line = input("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/clear":
            messages = []
            continue
        messages.append({"role": "user", "content": line})
        try:
            answer = answer_turn(loaded, messages, settings, sampling)
        except ValueError as e:
            print(f"\nerror: {e}", file=sys.stderr)  # ends the "assistant> " line
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})


def answer_turn(loaded, messages, settings, sampling) -> str:
    """Print the answer as it streams; Ctrl-C keeps what was said so far."""
    def notify(note):
        print(f"[{note}]", file=sys.stderr)

    print("assistant> ", end="", flush=True)
    shown = ""
    stream = stream_reply(loaded, messages, settings.system_prompt, sampling,
                          max_input_tokens=settings.max_input_tokens, notify=notify)
    try:
        with closing(stream):  # closing the stream (also on Ctrl-C) stops the generating thread
            for shown_next in stream:
                print(shown_next[len(shown):], end="", flush=True)
                shown = shown_next
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print()
    return shown


if __name__ == "__main__":
    sys.exit(main())
