"""Packed documents stay independent through the whole hybrid stack with `train.document_masks`:
changing document A never changes document B's losses (Mamba conv/scan state resets at the
boundary, attention is masked to the document), Multi-Token Prediction losses included, while
without masks it does."""

import json
import subprocess
import sys

from helpers import REPO, hymoe


def test_document_b_does_not_see_document_a():
    r = subprocess.run([sys.executable, str(REPO / "tests/distributed/docmask_worker.py")],
                       capture_output=True, text=True, timeout=300, check=True)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["masked_docA"] > 1e-3  # the perturbation is real
    assert d["masked"] < 1e-6, d
    assert d["unmasked"] > 1e-3, d  # and without masks information does cross
    # MTP depth losses over document B: unchanged with masks (positions whose targets lie past
    # the boundary are left out: depth d counts 23 - d positions of B's 23), changed without.
    assert d["mtp_masked"] < 1e-6, d
    assert d["mtp_unmasked"] > 1e-3, d
    assert d["mtp_masked_tokens"] == [2 * (23 - 1), 2 * (23 - 2)]


def test_training_with_document_masks(demo_data, tmp_path):
    run = tmp_path / "run"
    r = hymoe("train", "tiny", "train.document_masks=true", "train.steps=4", "optim.warmup_steps=1",
              "train.global_batch=2", "train.micro_batch=2", "train.seq_len=64",
              "logging.progress=false", "logging.wandb=disabled", "checkpoint.save_final=false",
              f"run.dir={run}", f"data.path={demo_data}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["loss"] == row["loss"] for row in rows)
