"""Validation loss during training (`train.eval_interval`, hymoe.train.validation): at the right
steps, over the same held-out batches each time; its value is the token-mean loss of the saved
model on those batches computed independently in one process (also after training at pp2 with
virtual stages, through megatron's forward-only interleaved schedule); and training with
validation is bit-identical to training without it (NVFP4 and MTP included)."""

import json

import pytest
import torch
from helpers import hymoe, hymoe_torchrun

FAST = ["optim.warmup_steps=2", "logging.progress=false", "logging.wandb=disabled",
        "train.global_batch=4", "train.micro_batch=2", "train.seq_len=64"]


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def independent_val_loss(run, valid_data, iters: int, global_batch: int = 4, seq_len: int = 64):
    """The final checkpoint in one process, on the first ``iters`` global batches of the held-out
    stream (the rows do not depend on the micro-batch or the layout): token-mean loss."""
    from hymoe.data.loader import PackedStream
    from hymoe.train.eval_model import load_model

    model, _, _ = load_model(run)
    stream = PackedStream(valid_data, seq_len, global_batch, seed=0)
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for _ in range(iters):
            b = next(stream)
            loss = model(b["tokens"], None, None, labels=b["labels"]).double()
            total += float((loss * b["loss_mask"]).sum())
            tokens += float(b["loss_mask"].sum())
    stream.close()
    return total / tokens


def test_validation_at_interval_and_end_equals_the_saved_model(demo_data, valid_data, tmp_path):
    run = tmp_path / "run"
    r = hymoe("train", "tiny", *FAST, "train.steps=7", "train.eval_interval=3", "train.eval_iters=2",
              f"data.valid_path={valid_data}", f"run.dir={run}", f"data.path={demo_data}")
    assert r.returncode == 0, r.stderr[-3000:]
    val = {m["step"]: m for m in metrics(run) if "val/loss" in m}
    assert sorted(val) == [3, 6, 7]  # every 3 steps, and after the last
    assert all(m["val/tokens"] == 2 * 4 * 64 for m in val.values())
    assert "validation at step 3 | loss" in r.stdout
    assert val[7]["val/loss"] < val[3]["val/loss"]  # held-out text: it learns, not memorises
    want = independent_val_loss(run, valid_data, iters=2)
    assert val[7]["val/loss"] == pytest.approx(want, rel=1e-5)


def test_training_is_unchanged_by_validation(demo_data, valid_data, tmp_path):
    """NVFP4 (stochastic rounding, Hadamard signs) with an MTP depth and MoE: every training
    number of every step is bitwise the same with and without validation in between."""
    rows = {}
    for name, extra in (("with", ["train.eval_interval=2", "train.eval_iters=1",
                                  f"data.valid_path={valid_data}"]), ("without", [])):
        run = tmp_path / name
        r = hymoe("train", "tiny", *FAST, "train.steps=5", "precision=nvfp4",
                  "model.pattern=M*EM-E/*E", *extra, f"run.dir={run}", f"data.path={demo_data}",
                  "checkpoint.save_final=false")
        assert r.returncode == 0, r.stderr[-3000:]
        rows[name] = metrics(run)
    with_val, without = rows["with"], rows["without"]
    assert [m["step"] for m in with_val if "val/loss" in m] == [2, 4, 5]
    keys = [k for k in without[0] if k in ("loss", "grad_norm", "lr") or k.startswith(("mtp_", "moe/"))]
    assert "mtp_loss/depth1" in keys and any(k.startswith("moe/") for k in keys)
    for a, b in zip(with_val, without):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]


@pytest.mark.distributed
def test_validation_under_interleaved_pipeline(demo_data, valid_data, tmp_path):
    run = tmp_path / "run"
    r = hymoe_torchrun(2, "train", "tiny", *FAST, "train.steps=2", "parallel.pp=2", "parallel.vpp=3",
                       "train.eval_interval=2", "train.eval_iters=2", f"data.valid_path={valid_data}",
                       f"run.dir={run}", f"data.path={demo_data}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = metrics(run)[-1]
    assert last["val/loss"] == pytest.approx(independent_val_loss(run, valid_data, iters=2), rel=1e-5)


def test_validation_data_with_another_tokenizer_stops_at_start(demo_data, tmp_path):
    other = tmp_path / "other"
    r = hymoe("data", "demo", "--output", str(other), "--vocab", "300", "--max-bytes", "60000")
    assert r.returncode == 0, r.stderr
    r = hymoe("train", "tiny", *FAST, "train.steps=2", "train.eval_interval=1",
              f"data.valid_path={other}", f"run.dir={tmp_path / 'run'}", f"data.path={demo_data}")
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("hymoe: error: DataError: data.valid_path:"), r.stderr
    assert "tokenizer" in lines[-1] and not (tmp_path / "run" / "metrics.jsonl").exists()
