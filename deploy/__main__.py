"""`python -m deploy push|deploy`: the Makefile's `push` and `deploy` targets.

push:   upload RUN/merged with a model card to HUB (hf | openxlab) as REPO.
deploy: push the model if the hub has none, then deploy the chat app
        (hf: a Docker Space SPACE; openxlab: an app bundle to hand to its web UI).
Tokens are read from the environment (or the hub's login cache), never from arguments."""
import argparse
import sys
from pathlib import Path

import requests
from huggingface_hub import constants

from chat.model_files import IncompleteModel
from deploy import DeployError, hf, openxlab, space
from deploy.card import read_run
from deploy.gguf import QUANTS
from deploy.repo_ids import check_repo_id


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["push", "deploy"])
    parser.add_argument("--hub", default="hf", help="hf | openxlab")
    parser.add_argument("--repo", default="", help="model repo id, user/name")
    parser.add_argument("--space", default="", help="Space id for HUB=hf deploy, user/name")
    parser.add_argument("--run", default="runs/assistant", type=Path, help="run directory holding merged/")
    parser.add_argument("--name", default="", help="title when RUN has no run.json")
    parser.add_argument("--private", default="0", help="1: create the model repo private (HF)")
    parser.add_argument("--revision", default="", help="branch to push to and serve (default main)")
    parser.add_argument("--hardware", default="", help="Space hardware to request, e.g. t4-small")
    parser.add_argument("--quant", default="", help="GGUF a CPU Space serves (RUN/gguf/model-QUANT.gguf)")
    args = parser.parse_args(argv)
    if args.hub not in ("hf", "openxlab"):
        raise DeployError(f"HUB={args.hub!r}: use hf or openxlab")
    if args.private not in ("0", "1", ""):
        raise DeployError(f"PRIVATE={args.private!r}: use 1 (private) or 0")
    args.private = args.private == "1"
    if args.private and args.hub == "openxlab":
        raise DeployError("PRIVATE=1 is for HUB=hf: OpenXLab repos are made private in its web UI")
    args.revision = args.revision or "main"
    check_repo_id("REPO", args.repo)
    if args.action == "deploy" and args.hub == "hf":
        check_repo_id("SPACE", args.space)
        space.check_hardware(args.hardware)
    args.quant = args.quant or "q8_0"
    if args.quant not in QUANTS:
        raise DeployError(f"QUANT={args.quant!r}: use one of {', '.join(QUANTS)}")
    return args


def run_name(args) -> str:
    return read_run(args.run)["name"] if (args.run / "run.json").is_file() else args.name or args.repo.split("/")[1]


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.hub == "openxlab":
            if args.action == "push":
                openxlab.push_model(args.run, args.repo, args.revision)
            else:
                openxlab.deploy_app(args.run, args.repo, run_name(args), args.revision)
        elif args.action == "push":
            files = hf.model_files(args.run, args.repo, args.revision)  # local checks before any request
            hf.push_model(hf.connect(args.repo), files, args.repo, args.private, args.revision)
        else:
            api = hf.connect(args.repo, args.space)
            space.deploy_space(api, args.run, args.repo, args.space, run_name(args), args.private,
                               args.revision, args.hardware, args.quant)
    except (DeployError, IncompleteModel) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except requests.RequestException as e:  # the hub answered with an error or not at all
        print(f"error: {constants.ENDPOINT}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
