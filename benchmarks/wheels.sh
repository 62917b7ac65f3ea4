#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels that benchmarks/gpu_check.sh installs on a
# GPU machine without network. That machine has Python 3.12, torch, numpy, safetensors, rich,
# einops, psutil, matplotlib and PyYAML, but not megatron-core, hydra-core/omegaconf/antlr4,
# webdataset or mamba-ssm.
#
#   bash benchmarks/wheels.sh [DEST]      # DEST defaults to .cache/gpu_wheels (git ignores .cache/)
#
# DEST then travels with the working tree (the device tool: carry [".cache/gpu_wheels"]); everything
# that travels must stay under 64 MiB, so this script refuses to leave more than 32 MiB.
# Pins come from pyproject.toml; torch, nvidia-* and anything else that would pull CUDA are never
# downloaded (--no-deps; each needed dependency is named below). wandb and submitit are left out:
# `hymoe train ... logging.wandb=disabled` does not import them.
# HYMOE_WHEELS_PYTHON=3.11 fetches for another Python (to test gpu_check.sh's install step here).
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${1:-.cache/gpu_wheels}
PYVER=${HYMOE_WHEELS_PYTHON:-3.12}
MAX_MIB=32
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
PIP=("$PY" -m pip --disable-pip-version-check)

# Exact pins from pyproject.toml for the packages the GPU machine lacks (tokenizers: it has 0.23.2,
# hymoe pins 0.23.3). A missing or non-exact pin is an error: the wheels must match the project.
PINNED=$("$PY" - <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = {}
for spec in deps:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;,]+)\s*", spec)
    if m:
        pins[m.group(1).lower()] = m.group(2)
want = ["megatron-core", "hydra-core", "omegaconf", "webdataset", "tokenizers"]
missing = [w for w in want if w not in pins]
if missing:
    sys.exit(f"wheels.sh: pyproject.toml has no exact (==) pin for {missing}")
print(" ".join(f"{w}=={pins[w]}" for w in want))
EOF
)
# Their dependencies that the GPU machine lacks, pinned here: hydra-core 1.3.8 and omegaconf 2.3.0
# require antlr4-python3-runtime==4.9.* (4.9.3 is the last; sdist only, so it is built below);
# webdataset needs braceexpand. setuptools and wheel build hymoe's editable install offline.
EXTRA="braceexpand==0.1.7 setuptools==80.9.0 wheel==0.45.1"
ANTLR="antlr4-python3-runtime==4.9.3"
# mamba-ssm's Triton SSD kernels for benchmarks/ssd_kernels_check.py (pin: pyproject's `gpu` extra).
# PyPI has only its sdist; built here with its CUDA extensions skipped it is a 0.2 MB pure-Python
# wheel (its Triton code is all the SSD path needs). --no-deps: the GPU machine has triton and
# einops; its other dependencies (tilelang, quack-kernels, ...) serve kernels hymoe does not call.
MAMBA=$("$PY" - <<'EOF'
import re, sys, tomllib
gpu = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]
pins = [s.strip() for s in gpu if re.fullmatch(r"\s*mamba-ssm\s*==\s*\S+\s*", s)]
if not pins:
    sys.exit("wheels.sh: pyproject.toml's gpu extra has no exact (==) pin for mamba-ssm")
print(pins[0])
EOF
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST"/SHA256SUMS  # one version of each: two stop the install

echo "downloading for CPython $PYVER (x86-64): $PINNED $EXTRA"
# shellcheck disable=SC2086  # word-splitting the package lists is intended
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$DEST" $PINNED $EXTRA

echo "building $ANTLR (PyPI has only its sdist; the wheel is pure Python)"
"${PIP[@]}" wheel --quiet --no-deps -w "$DEST" "$ANTLR"
ls "$DEST"/antlr4_python3_runtime-4.9.3-py3-none-any.whl >/dev/null

echo "building $MAMBA (sdist only on PyPI; CUDA extensions skipped: a pure-Python wheel)"
# --no-build-isolation: its setup.py imports torch, which must not be downloaded for the build.
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
    "${PIP[@]}" wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$MAMBA"
ls "$DEST"/mamba_ssm-*-py3-none-any.whl >/dev/null

if ls "$DEST" | grep -Eiq '^(torch|triton|nvidia_)'; then
    echo "wheels.sh: a torch/triton/nvidia wheel is in $DEST; the GPU machine's own is used" >&2
    exit 1
fi

(cd "$DEST" && sha256sum -- *.whl > SHA256SUMS)
bytes=$(cat "$DEST"/*.whl | wc -c)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo
ls -l "$DEST" | awk 'NR > 1 { printf "  %10d  %s\n", $5, $9 }'
echo "total: $(ls "$DEST"/*.whl | wc -l) wheels, $bytes bytes ($mib MiB) in $DEST"
if [ "$bytes" -gt $((MAX_MIB * 1048576)) ]; then
    echo "wheels.sh: over $MAX_MIB MiB (all that travels to the GPU machine: 64 MiB at most)" >&2
    exit 1
fi
echo "next: benchmarks/gpu_check.sh on the GPU machine, $DEST carried along (docs/benchmarks.md)"
