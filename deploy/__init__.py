"""Hub push and deploy: `python -m deploy push|deploy` (driven by `make push` / `make deploy`).

hf.py pushes a merged model to the Hugging Face Hub, space.py deploys the chat app as a Docker
Space (on CPU hardware: the GGUF through llama.cpp, which start_cpu.py starts in the image), openxlab.py does both for OpenXLab (git + git-lfs), card.py writes the model card and
bundle.py picks the app files both hubs serve."""


class DeployError(Exception):
    """A problem the user can fix: printed as one `error:` line, exit status 1."""
