#!/usr/bin/env bash
# `make gpu-check`: hymoe's GPU checks in one script, under 8 minutes on one NVIDIA GPU.
#
# 1. No nvidia-smi: say so and exit 0 (a clean skip on CPU machines and in CI).
# 2. Python: python3 as it is if it already has hymoe and its dependencies (the Docker image);
#    otherwise a venv with --system-site-packages (keeps the machine's torch) into which go the
#    wheels from benchmarks/wheels.sh (--no-index: the GPU machines cannot download) and hymoe -e.
# 3. nvidia-smi, torch/CUDA and package versions; then benchmarks/gpu_check.py checks the Triton
#    quantization kernels (benchmarks/triton_check.py: bits against the eager path, throughput
#    against a copy, an NVFP4 linear step against BF16) and the Mamba-2 SSD scan
#    (benchmarks/ssd_kernels_check.py: mamba-ssm's Triton scan against hymoe's, and their times),
#    trains tiny_gpu in BF16 for 50 steps, tiny in BF16 and in emulated NVFP4 for 20 steps each
#    and, time allowing, tiny_gpu in NVFP4 for 20 steps, each with a timeout. The summary goes to $OUT/gpu_check.txt
#    (with .json and the runs' .log) when OUT is set, else to stdout and $WORK.
#
# Environment: PYTHON (python3), HYMOE_WHEELS (.cache/gpu_wheels), HYMOE_GPU_CHECK_DIR (scratch,
# /tmp/hymoe-gpu-check), HYMOE_GPU_CHECK_BUDGET_S (450, the whole script),
# HYMOE_GPU_CHECK_ALLOW_CPU=1 (run without a GPU, short runs: tests this script, measures nothing).
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=${HYMOE_GPU_CHECK_BUDGET_S:-450}
HOST_PY=${PYTHON:-python3}
WHEELS=${HYMOE_WHEELS:-.cache/gpu_wheels}
WORK=${HYMOE_GPU_CHECK_DIR:-${TMPDIR:-/tmp}/hymoe-gpu-check}
ALLOW_CPU=${HYMOE_GPU_CHECK_ALLOW_CPU:-0}

say() { echo "[gpu-check] $*"; }
die() { echo "gpu-check: FAILED: $*" >&2; exit 1; }

# -- 1. a GPU? ------------------------------------------------------------------------------------
if [ "$ALLOW_CPU" != 1 ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "no NVIDIA GPU: gpu-check needs one"
        echo "gpu-check: skipped (nvidia-smi not found); see docs/benchmarks.md for where to run it"
        if [ -n "${OUT:-}" ]; then
            mkdir -p "$OUT"
            echo "gpu-check skipped: no NVIDIA GPU (nvidia-smi not found)" > "$OUT/gpu_check.txt"
        fi
        exit 0
    fi
    gpus=$(timeout 60 nvidia-smi -L 2>&1)
    if ! grep -q '^GPU ' <<< "$gpus"; then
        echo "no NVIDIA GPU: gpu-check needs one (nvidia-smi lists none; check the driver)"
        echo "$gpus"
        exit 1
    fi
fi
command -v "$HOST_PY" >/dev/null 2>&1 || die "$HOST_PY not found (set PYTHON)"

# -- 2. a Python with hymoe -----------------------------------------------------------------------
has_hymoe() {
    "$1" - >/dev/null 2>&1 <<'EOF'
import importlib.util, sys
mods = ("torch", "megatron.core", "hydra", "omegaconf", "tokenizers", "hymoe.train")
sys.exit(0 if all(importlib.util.find_spec(m) for m in mods) else 1)
EOF
}

mkdir -p "$WORK"
if has_hymoe "$HOST_PY"; then
    PY=$HOST_PY
    say "using $(command -v "$HOST_PY"): it already has hymoe and its dependencies"
else
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || die "no wheels in $WHEELS: run" \
        "'bash benchmarks/wheels.sh' where PyPI is reachable, then bring $WHEELS along"
    if [ -f "$WHEELS/SHA256SUMS" ]; then
        (cd "$WHEELS" && sha256sum --quiet -c SHA256SUMS) \
            || die "the wheels in $WHEELS do not match their SHA256SUMS"
    fi
    VENV=$WORK/venv
    rm -rf "$VENV"
    say "creating $VENV (--system-site-packages), installing $(ls "$WHEELS"/*.whl | wc -l) wheels"
    # --without-pip: no ensurepip needed; the host's pip is reachable through the system site.
    "$HOST_PY" -m venv --system-site-packages --without-pip "$VENV" || die "python -m venv failed"
    # The host python3 may itself be a venv (on the H200 machines it is /opt/torch/.venv): then
    # --system-site-packages reaches the base interpreter's packages, not that venv's torch. A .pth
    # file adds the host's site-packages after the new venv's own, so torch stays visible and the
    # wheels installed here come first.
    "$HOST_PY" - "$VENV" <<'EOF' || die "could not link the host's site-packages"
import pathlib, site, sys, sysconfig
venv = pathlib.Path(sys.argv[1])
if sys.prefix != sys.base_prefix:
    purelib = pathlib.Path(sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv}))
    purelib.mkdir(parents=True, exist_ok=True)
    lines = [f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()]
    (purelib / "_hymoe_host_site.pth").write_text("\n".join(lines) + "\n")
EOF
    PY=$VENV/bin/python
    "$PY" -m pip --version >/dev/null 2>&1 || die "no pip reachable from $PY (the host needs pip)"
    PIP=("$PY" -m pip --disable-pip-version-check --no-input --quiet)
    "${PIP[@]}" install --no-index --find-links "$WHEELS" --no-deps --no-compile \
        --ignore-installed "$WHEELS"/*.whl || die "installing the wheels from $WHEELS failed"
    # Editable and offline, built with the setuptools and wheel just installed from $WHEELS.
    "${PIP[@]}" install --no-index --no-deps --no-build-isolation -e . \
        || die "pip install -e . failed"
    has_hymoe "$PY" || die "hymoe or one of its dependencies is still missing in $VENV"
fi

# -- 3. the machine, then the checks --------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then timeout 60 nvidia-smi; fi
mapfile -t HEADER < <("$PY" - <<'EOF'
import datetime, importlib.metadata as md, platform, warnings
warnings.filterwarnings("ignore")
import torch

def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"

def importable(mod):
    try:
        __import__(mod)
        return "importable"
    except (ImportError, RuntimeError, OSError) as e:  # TE without its libraries: RuntimeError
        return f"not importable, {type(e).__name__}"

print(f"hymoe gpu-check {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, compute capability {p.major}.{p.minor}, "
          f"{p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible")
else:
    print("gpu: none (torch.cuda.is_available() is False)")
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"triton {version('triton')}")
print(f"megatron-core {version('megatron-core')}, hydra-core {version('hydra-core')}, "
      f"tokenizers {version('tokenizers')}, hymoe {version('hymoe')}")
print(f"transformer_engine {version('transformer_engine')} ({importable('transformer_engine')}), "
      f"mamba-ssm {version('mamba-ssm')}, apex {version('apex')}")
EOF
)
[ "${#HEADER[@]}" -gt 0 ] || die "$PY could not import torch"
printf '%s\n' "${HEADER[@]}"
case "${HEADER[1]:-}" in
    "gpu: none"*) [ "$ALLOW_CPU" = 1 ] || die "torch sees no CUDA device; nvidia-smi lists one" ;;
esac

LEFT=$((BUDGET - SECONDS - 15))
[ "$LEFT" -gt 60 ] || die "setup took ${SECONDS} s of the ${BUDGET} s budget; no time left"
ARGS=(--work "$WORK" --budget-s "$LEFT")
[ -n "${OUT:-}" ] && ARGS+=(--out "$OUT")
[ "$ALLOW_CPU" = 1 ] && ARGS+=(--allow-cpu --only triton-kernels,ssd-kernels,tiny-bf16,tiny-nvfp4 --steps 7)
for line in "${HEADER[@]}"; do ARGS+=(--header "$line"); done
say "setup took ${SECONDS} s; the checks get ${LEFT} s"
timeout --kill-after=10 $((LEFT + 20)) "$PY" benchmarks/gpu_check.py "${ARGS[@]}"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu-check: FAILED: over its ${BUDGET} s budget" >&2
say "total ${SECONDS} s"
exit "$rc"
