# syntax=docker/dockerfile:1
# The ERW image: every pipeline step and every training pod runs it.
#
#   docker build -t REGISTRY/erw:0.1.0 .
#   docker push REGISTRY/erw:0.1.0
#   erw pipeline submit image=REGISTRY/erw:0.1.0 ...
#
# Base: the PyTorch release this repository pins (torch 2.14.1, CUDA 13.0, cuDNN 9). For a
# reproducible build pin it by digest as well: --build-arg BASE_IMAGE=pytorch/pytorch:...@sha256:...
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # One rank per GPU; each rank's CPU work (augmentation, decoding) gets a few threads, not all cores.
    OMP_NUM_THREADS=8 \
    # NCCL: report problems, and let a hung collective fail the rank so torchrun/Volcano restart the job.
    NCCL_DEBUG=WARN \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    HOME=/home/erw \
    HF_HOME=/home/erw/.cache/huggingface

RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash erw
WORKDIR /app

# Dependencies first, in their own layer: exact versions (docker/lock.py writes the lock).
COPY docker/requirements.lock docker/requirements.lock
RUN python -m pip install -r docker/requirements.lock \
 && python -m pip check \
 && python -c "import torch; v = torch.__version__.split('+')[0]; assert v == '2.14.1', v"

# The package itself, and the config presets the pipeline refers to by relative path.
COPY pyproject.toml README.md ./
COPY erw erw
COPY components components
COPY pipeline pipeline
COPY configs configs
RUN python -m pip install --no-deps . \
 && erw --help > /dev/null

# Numeric, so Kubernetes can verify runAsNonRoot.
USER 1000:1000
ENTRYPOINT ["erw"]
CMD ["--help"]
