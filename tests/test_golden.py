"""Golden losses: the first 20 per-step losses of the `tiny` recipe on CPU (fp32 compute), for the
BF16 arm and the emulated-NVFP4 arm, stored in tests/golden/. A change to the model, the numerics,
the data order or the optimizer shows up here first. Regenerate deliberately with
``HYMOE_REGEN_GOLDEN=1 pytest tests/test_golden.py`` and say why in the commit.

The corpus is synthetic and made here (not the stdlib, whose text changes with the Python version).
"""

import json
import os
import random

import pytest
from helpers import REPO, hymoe

GOLDEN = REPO / "tests" / "golden"
# fp32 on CPU is deterministic on one machine; across CPU kernels (AVX2 vs AVX-512) summation order
# may differ, which stays far below this over 20 steps.
RTOL = 2e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(1234)
    words = [rng.choice("abcdefghijklmnopqrstuvwxyz") * rng.randint(1, 6) for _ in range(400)]
    src = tmp_path_factory.mktemp("golden_src")
    for d in range(60):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(50, 400)))
        (src / f"doc{d:03d}.txt").write_text(text + "\n")
    out = tmp_path_factory.mktemp("golden_data") / "data"
    r = hymoe("data", "prepare", "--input", str(src / "*.txt"), "--output", str(out),
              "--train-tokenizer", "300", "--shard-tokens", "20000")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("precision", ["bf16", "nvfp4"])
def test_first_20_losses(corpus, tmp_path, precision):
    run = tmp_path / precision
    r = hymoe("train", "tiny", f"precision={precision}", "train.steps=20", "optim.warmup_steps=5",
              "train.global_batch=4", "train.micro_batch=2", "train.seq_len=64",
              "logging.progress=false", "logging.wandb=disabled", "checkpoint.save_final=false",
              f"run.dir={run}", f"data.path={corpus}", "data.prepare_demo_if_missing=false")
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    path = GOLDEN / f"tiny_{precision}.json"
    if os.environ.get("HYMOE_REGEN_GOLDEN"):
        path.write_text(json.dumps({"recipe": "tiny", "precision": precision, "losses": losses}, indent=1))
        pytest.skip(f"regenerated {path.name}")
    golden = json.loads(path.read_text())["losses"]
    assert losses == pytest.approx(golden, rel=RTOL)
