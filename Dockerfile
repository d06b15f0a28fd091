# The image every kfp component and Ray pod runs: scalekd with its pinned requirements.
#   CPU:  docker build -t ghcr.io/scalekd/scalekd:0.1.0 .
#   CUDA: docker build --build-arg TORCH_VARIANT=cu130 -t ghcr.io/scalekd/scalekd:0.1.0-cuda .
# Not built in this repository's CI (no Docker engine there); tests check it installs the same pins.
FROM python:3.11-slim-bookworm

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# PYTHONPATH: components/ and pipelines/ are not in the wheel (pyproject.toml); the image provides them.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_TRAIN_V2_ENABLED=1 PYTHONPATH=/opt/scalekd

WORKDIR /opt/scalekd
COPY requirements.txt ./
# torch first, from the index matching the variant, so nothing else can pull a different build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
 && pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY scalekd ./scalekd
COPY components ./components
COPY pipelines ./pipelines
RUN pip install --no-deps . && python -c "import scalekd, torchvision.ops; print('scalekd ok')"

RUN useradd --create-home --uid 1000 scalekd
USER 1000
ENTRYPOINT ["scalekd"]
