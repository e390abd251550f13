"""Hub push and deploy: `python -m deploy push|deploy` (driven by `make push` / `make deploy`).

hf.py pushes a merged model to the Hugging Face Hub, space.py deploys the chat app as a Docker
Space, card.py writes the model card and bundle.py picks the app files a hosted app serves."""


class DeployError(Exception):
    """A problem the user can fix: printed as one `error:` line, exit status 1."""
