# syntax=docker/dockerfile:1
# The ERW image: every pipeline step and every training pod runs it.
#
#   make image IMAGE=REGISTRY/erw:0.1.0 \
#     BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime@sha256:<digest>   (container/build.sh)
#   docker push REGISTRY/erw:0.1.0
#   erw pipeline submit image=REGISTRY/erw:0.1.0 ...
#
# Base: the PyTorch release this repository pins (torch 2.14.1, CUDA 13.0, cuDNN 9). Pin it by
# digest for a reproducible build (`docker buildx imagetools inspect <tag>` prints the digest).
# CUDA 13.0 needs NVIDIA driver R580 or newer and a Turing or newer GPU (no V100). For nodes with
# an older driver (R535-R570) build the CUDA 12.6 variant:
#   --build-arg BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime --build-arg CUDA=cu126
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}
# The CUDA build of torch: cu130 is the one locks/runtime.txt pins; any other value installs the
# lock without its CUDA-built distributions and takes torch and torchvision at the locked versions
# from https://download.pytorch.org/whl/${CUDA}. Match BASE_IMAGE.
ARG CUDA=cu130

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The base's Python is Ubuntu's, "externally managed" (PEP 668): pip refuses to install into it.
    # erw lives in a virtual environment that still sees the base's torch and CUDA libraries
    # (--system-site-packages), so they are not installed a second time when the lock matches.
    VIRTUAL_ENV=/opt/erw \
    PATH=/opt/erw/bin:$PATH \
    # One rank per GPU; each rank's CPU work (augmentation, decoding) gets a few threads, not all cores.
    OMP_NUM_THREADS=8 \
    # NCCL: report problems, and let a hung collective fail the rank so torchrun/Volcano restart the job.
    NCCL_DEBUG=WARN \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    HOME=/home/erw \
    # Training pods run with a read-only root filesystem and one writable emptyDir at /tmp
    # (erw/launch/volcano.py): every cache goes there.
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/cache/huggingface \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/cache/torchinductor \
    MPLCONFIGDIR=/tmp/cache/matplotlib

RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash erw \
 && python3 -m venv --system-site-packages --without-pip /opt/erw \
 && python3 -m pip --version
WORKDIR /app

# Dependencies first, in their own layer, exactly as locked and hash-checked (`make lock` writes
# the lock; --no-deps because it is the whole closure, which `pip check` then verifies).
# Behind a TLS-intercepting proxy, the build passes the machine's CA bundle as the secret pip_ca
# (container/build.sh does): pip trusts it for this step only, and no layer keeps it.
COPY locks/runtime.txt locks/
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && if [ "$CUDA" = cu130 ]; then \
      python3 -m pip install --no-deps --require-hashes -r locks/runtime.txt; \
    else \
      awk '/^[^ #]/ { cuda = /^((torch|torchvision|triton)==|(nvidia|cuda)-)/ } !cuda' locks/runtime.txt > /tmp/portable.txt \
      && python3 -m pip install --no-deps --require-hashes -r /tmp/portable.txt \
      && python3 -m pip install --index-url "https://download.pytorch.org/whl/$CUDA" \
        $(grep -oE '^(torch|torchvision)==[^ ;]+' locks/runtime.txt); \
    fi \
 && python3 -m pip check \
 && python3 -c "import torch; v = torch.__version__.split('+')[0]; assert v == '2.14.1', v"

# The package, built from a copy outside the working directory (its build backend, setuptools, is
# in the lock: no isolated build fetching another) and installed into the venv; the copy is then
# deleted. So the code that runs is the venv's, owned by root: `python -m erw.cli` from /app cannot
# pick up a writable copy instead. /app holds the presets (read-only), which the pipeline names by
# relative path (configs/...).
COPY pyproject.toml README.md /tmp/erw-src/
COPY erw /tmp/erw-src/erw
COPY components /tmp/erw-src/components
COPY pipeline /tmp/erw-src/pipeline
COPY configs /tmp/erw-src/configs
RUN python3 -m pip install --no-deps --no-build-isolation /tmp/erw-src \
 && rm -rf /tmp/erw-src \
 && erw --help > /dev/null
COPY configs configs

# Numeric, so Kubernetes can verify runAsNonRoot. It owns nothing in the image: training pods run
# with a read-only root filesystem and write only to their volumes (/tmp) and to storage.
USER 1000:1000
# No ENTRYPOINT: a pod's `command`, KFP's `sh -c ...` and `docker run IMAGE erw train ...` all name
# the program themselves (with an ENTRYPOINT, Docker and kfp.local's DockerRunner would pass KFP's
# command to it as arguments).
CMD ["erw", "--help"]
