# hymoe — the two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel.
TORCH := torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install oracles demo test lint gpu-check slurm clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[dev]"
	$(MAKE) oracles
	touch $@

# Transformer Engine's pure-PyTorch NVFP4 reference quantizer is the numerics oracle
# (tests/test_nvfp4_te_reference.py). TE has no CPU build, so only its plain-Python wheel is
# fetched (1.2 MB, never installed); the test skips if this download is impossible.
TE_WHEEL := $(HOME)/.cache/hymoe/transformer_engine-2.20.2-py3-none-any.whl
# mamba-ssm's Triton SSD scan is checked against hymoe's in Triton's interpreter
# (tests/test_ssd_kernels.py). Only its Python sources: PyPI has just its sdist (0.2 MB), built in
# seconds with its CUDA extensions skipped (MAMBA_SKIP_CUDA_BUILD; MAMBA_FORCE_BUILD stops setup.py
# looking for a prebuilt wheel online), against the installed torch (--no-build-isolation), and
# without its dependencies (--no-deps: tilelang, quack-kernels, ... are for kernels hymoe does not
# call; triton, einops come with hymoe). Not in pyproject's dev extra, which cannot carry these.
MAMBA_SSM := mamba-ssm==2.3.2.post1
oracles:
	@test -f $(TE_WHEEL) || $(PIP) download --no-deps --only-binary=:all: -d $(dir $(TE_WHEEL)) transformer_engine==2.20.2 || echo "TE wheel not downloaded: its oracle test will skip"
	@MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(PIP) install --no-build-isolation --no-deps $(MAMBA_SSM) || echo "mamba-ssm not installed: tests/test_ssd_kernels.py's interpreted comparison will skip"

# Prepare the embedded corpus, train the tiny hybrid MoE in BF16 and in emulated NVFP4,
# and write the loss-curve comparison (runs/demo/).
demo: install
	$(BIN)/hymoe demo

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

# A one-node Slurm cluster on this machine (root; installs the Debian packages on first use), for
# tests/test_launch_slurm.py and for trying `hymoe launch slurm` (docs/launch.md).
slurm:
	bash tests/slurm/start_cluster.sh --install

# Every GPU check in one script (< 8 minutes); see docs/benchmarks.md.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
