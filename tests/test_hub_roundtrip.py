"""The whole hand-off: `make push` the merged model to the (fake) Hub, start the real app with
MODEL_ID=user/name pointed at that Hub, and the chat answers as NAME's assistant. The fake Hub
advertises Xet storage and refuses Xet transfers, so this passes only over plain HTTP, the path
the kit takes though hf_xet is installed (docs/publishing.md: "Hub transfers")."""
import re
from contextlib import ExitStack

import pytest
from gradio_client import Client

from app_server import AppServer
from conftest import NAME
from deploy_helpers import TOKEN, USER, deploy, hub_env

MODEL = f"{USER}/ada-assistant"


def ask(app) -> str:
    client = Client(app.url, analytics_enabled=False, verbose=False)
    return client.predict(message="Who are you?", temperature=0, api_name="/chat")[0]


@pytest.mark.timeout(600)
def test_pushed_private_model_is_served_by_the_app_from_the_hub_then_offline(hub, run_dir, tmp_path):
    import hf_xet  # noqa: F401 - installed with huggingface_hub, as for users: Xet would be used
    env = hub_env(hub, tmp_path)
    pushed = deploy("push", "--repo", MODEL, "--run", run_dir, "--private", "1", env=env)
    assert pushed.returncode == 0, pushed.stderr
    served = {"MODEL_ID": MODEL, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
              "HF_HOME": str(tmp_path / "app-hf-home")}
    with ExitStack() as stack:  # start both at once: each start-up mostly waits on imports
        app = stack.enter_context(AppServer({**served, "HF_TOKEN": TOKEN}, wait_ready=False))
        no_token = stack.enter_context(AppServer({**served, "HF_HOME": str(tmp_path / "other-home")},
                                                 wait_ready=False))
        body = app.wait_for(lambda h: h["status"] != "loading", "the model to load")
        assert body["status"] == "ready", app.failure("not ready")
        assert NAME in ask(app)
        assert TOKEN not in app.log()
        # The private repo without HF_TOKEN: /health says why, and what to set.
        body = no_token.wait_for(lambda h: h["status"] != "loading", "the load to fail")
        assert no_token.health()[0] == 503 and body["status"] == "failed"
        assert re.search(f"model repo {MODEL} on .* not found .*private, set HF_TOKEN", body["error"]), body
    downloads = [r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    assert any(path.endswith(".safetensors") for path in downloads)     # the weights came from the hub
    assert hub.xet_requests == []

    # docs/serving.md: "Downloads are cached": the same HF_HOME serves with the hub unreachable.
    seen = len(hub.requests)
    with AppServer({**served, "HF_HUB_OFFLINE": "1"}) as offline:
        assert NAME in ask(offline)
    assert len(hub.requests) == seen
