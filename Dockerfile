# syntax=docker/dockerfile:1
# hymoe on NVIDIA's PyTorch container: the image's GPU stack (torch, CUDA, Transformer Engine,
# apex) plus the pinned packages hymoe needs on top of it.
#
#   docker build -t hymoe .
#   docker run --gpus all --ipc=host --rm -it hymoe make gpu-check
#
# Base: NGC PyTorch 25.11 (Ubuntu 24.04). It has Python 3.12.3, torch 2.10.0a0+b558c986e8.nv25.11
# (a pre-release build of 2.10), CUDA 13.0, Triton 3.5, Transformer Engine 2.9.0 and NVIDIA apex
# (built into the image; the PyPI package named `apex` is an unrelated web toolkit and is never
# installed here). Why this tag:
# - megatron-core 0.16.1 was tested on it: Megatron-LM's tag core_v0.16.1 names
#   nvcr.io/nvidia/pytorch:25.11-py3 in docker/.ngc_version.dev (its LTS image was 25.09-py3).
# - Transformer Engine 2.9.0 is >= 2.7 (megatron-core's fp4 path) and inside the range that
#   megatron-core 0.16.1's `dev` extra declares for it (>= 2.9, < 2.12). hymoe's `gpu` extra
#   (transformer-engine 2.20.2) is not installed here: the image's TE stays.
# - Python 3.12 satisfies megatron-core 0.16.1 (requires-python >= 3.10) and hymoe (>= 3.10,
#   < 3.12.99), and is the Python of the GPU machines that run `make gpu-check` without this image.
# - mamba-ssm 2.3.2.post1 wants triton >= 3.5, and both it and causal-conv1d 1.7.0 compile for
#   sm_90 and sm_100 with CUDA 13.
# These versions come from release notes and users' reports, not from this image (no Docker engine
# on hymoe's development machines); the check after FROM fails the build if Python or TE differ.
FROM nvcr.io/nvidia/pytorch:25.11-py3

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/hymoe

RUN python - <<'EOF'
import importlib.metadata as md, sys
from packaging.version import Version

te = Version(md.version("transformer_engine"))
print(f"python {sys.version.split()[0]}, torch {md.version('torch')}, transformer_engine {te}")
assert sys.version_info[:2] == (3, 12), "this Dockerfile is written for the image's Python 3.12"
assert te.release >= (2, 7), f"megatron-core's fp4 path needs Transformer Engine >= 2.7, not {te}"
try:
    print("apex (NVIDIA):", md.version("apex"))
except md.PackageNotFoundError:
    print("apex: not in this image (optional for hymoe)")
EOF

# Freeze the image's GPU stack: every pip install below must keep the image's torch, triton, TE,
# apex, numpy and CUDA libraries, or fail. This replaces NGC's /etc/pip/constraint.txt, which pins
# every preinstalled package and so would refuse hymoe's own pins.
RUN python -m pip list --format=freeze \
    | grep -iE -e '^(torch|torchvision|torchaudio|triton|pytorch-triton|apex|numpy)==' \
               -e '^(transformer[-_]engine|nvidia-|cuda-)[-_a-z0-9]*==' \
    > /opt/image-constraints.txt \
    && grep -iq '^torch==' /opt/image-constraints.txt \
    && cat /opt/image-constraints.txt
ENV PIP_CONSTRAINT=/opt/image-constraints.txt

# The CUDA/Triton packages, compiled against the image's torch: --no-build-isolation (an isolated
# build would fetch another torch) and FORCE_BUILD (their setup.py would otherwise download
# prebuilt wheels made for PyPI's torch, not NVIDIA's); their setup.py imports `wheel`; MAX_JOBS
# bounds nvcc's memory. --no-deps: they need only torch and triton from the image plus einops and
# transformers, which come with hymoe's pins below (mamba-ssm's tilelang and quack imports are
# optional, for Mamba-3 only).
# Pins as in pyproject's `gpu` extra (tests/test_dockerfile.py checks they agree).
ARG MAX_JOBS=4
RUN python -m pip install wheel==0.45.1
RUN MAX_JOBS=${MAX_JOBS} CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    python -m pip install --no-build-isolation --no-deps causal-conv1d==1.7.0
RUN MAX_JOBS=${MAX_JOBS} MAMBA_FORCE_BUILD=TRUE \
    python -m pip install --no-build-isolation --no-deps mamba-ssm==2.3.2.post1

RUN python -m pip install megatron-core==0.16.1

# The rest of hymoe's requirements and its `dev` extra (to run `make test` in the container), read
# from pyproject.toml so each pin lives in one place; torch and triton are left out, the image's
# stay (dev's triton pin is for the CPU interpreter tests).
# transformers (dev) is also what mamba-ssm imports.
COPY pyproject.toml /opt/hymoe/
RUN python - > /opt/hymoe-requirements.txt <<'EOF'
import tomllib
from packaging.requirements import Requirement

project = tomllib.load(open("/opt/hymoe/pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if Requirement(spec).name not in ("torch", "triton"):
        print(spec)
EOF
RUN cat /opt/hymoe-requirements.txt && python -m pip install -r /opt/hymoe-requirements.txt

# hymoe itself, editable, without touching the packages above. One COPY per folder that
# pyproject.toml maps into the package (tests/test_dockerfile.py checks none is missing).
COPY Makefile README.md* /opt/hymoe/
COPY hymoe/ /opt/hymoe/hymoe/
COPY model/ /opt/hymoe/model/
COPY precision/ /opt/hymoe/precision/
COPY parallel/ /opt/hymoe/parallel/
COPY data/ /opt/hymoe/data/
COPY train/ /opt/hymoe/train/
COPY launch/ /opt/hymoe/launch/
COPY recipes/ /opt/hymoe/recipes/
COPY tests/ /opt/hymoe/tests/
COPY benchmarks/ /opt/hymoe/benchmarks/
RUN python -m pip install --no-deps -e . \
    && hymoe --help > /dev/null
