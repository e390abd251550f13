"""The whole hand-off: `make push` the merged model to the (fake) Hub, start the real app with
MODEL_ID=user/name pointed at that Hub, and the chat answers as NAME's assistant."""
from gradio_client import Client

from app_server import AppServer
from conftest import NAME
from deploy_helpers import TOKEN, USER, deploy, hub_env

MODEL = f"{USER}/ada-assistant"


def test_pushed_private_model_is_served_by_the_app_from_the_hub(hub, run_dir, tmp_path):
    env = hub_env(hub, tmp_path)
    pushed = deploy("push", "--repo", MODEL, "--run", run_dir, "--private", "1", env=env)
    assert pushed.returncode == 0, pushed.stderr
    settings = {"MODEL_ID": MODEL, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "app-hf-home")}
    with AppServer(settings) as app:
        client = Client(app.url, analytics_enabled=False, verbose=False)
        answer, _ = client.predict(message="Who are you?", temperature=0, api_name="/chat")
        log = app.log()
    assert NAME in answer
    downloads = [r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    assert any(path.endswith(".safetensors") for path in downloads)     # the weights came from the hub
    assert TOKEN not in log
