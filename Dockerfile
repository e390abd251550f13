# The serving image: app.py + api.py + chat/ on the pinned requirements.txt. Hugging Face Docker Spaces
# build this file as is; `make image` / `make docker-run` build and run it on a local GPU.
#
# Base: slim Python rather than nvidia/cuda. The CUDA torch wheel from PyPI carries its own CUDA
# runtime (the nvidia-* wheels it depends on), so a CUDA base image would only add a second copy
# of the same libraries; the GPU driver comes from the host (`--gpus all`). Python 3.11 matches the
# interpreter the kit is pinned and tested on. The container test swaps in a local Debian base.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Spaces run the container as uid 1000; so does everyone else.
RUN useradd --create-home --uid 1000 user

# Dependencies first, in a root-owned venv the app cannot modify: this layer is rebuilt only when
# requirements.txt changes, so a code-only change rebuilds in seconds.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
COPY requirements.txt /opt/requirements.txt
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir -r /opt/requirements.txt

USER 1000
# HF_HOME holds downloaded models and InternLM2's remote code: a volume, so `docker run -v`
# keeps models across runs. It is created here so a fresh volume is owned by the user.
ENV HOME=/home/user \
    HF_HOME=/home/user/.cache/huggingface \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860
RUN mkdir -p "$HF_HOME"
VOLUME /home/user/.cache/huggingface

# The code, root-owned and read-only to the app. MODEL_ID, HF_TOKEN etc. are runtime settings.
WORKDIR /home/user/app
COPY app.py api.py guards.py ./
COPY chat/ chat/

EXPOSE 7860
# Healthy only once the model is loaded (the endpoint answers 503 before that, and on a model
# that cannot load). The start period covers the first download of a 1.8B model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['GRADIO_SERVER_PORT'] + '/health', timeout=8)"]
CMD ["python", "app.py"]
