"""`hymoe convert to-hf` / `from-hf` from the command line, and training from converted weights
(`checkpoint.init_weights`). Logit equality with transformers is in tests/test_hf_*.py."""

import json

from helpers import hymoe

ARGS = ["optim.warmup_steps=1", "logging.progress=false", "logging.wandb=disabled",
        "train.global_batch=2", "train.micro_batch=2", "train.seq_len=32"]


def first_loss(run):
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_round_trip_and_train_from_converted(demo_data, tmp_path):
    trained = tmp_path / "trained"
    r = hymoe("train", "tiny", *ARGS, "train.steps=12", "optim.lr=1e-2", f"run.dir={trained}",
              f"data.path={demo_data}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = hymoe("convert", "to-hf", str(trained / "checkpoints"), str(tmp_path / "hf"), "--dtype", "fp32")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h"
    r = hymoe("convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr[-2000:]
    runs = {}
    for name, extra in (("fresh", []), ("converted", [f"checkpoint.init_weights={tmp_path / 'back'}"])):
        runs[name] = tmp_path / name
        r = hymoe("train", "tiny", *ARGS, "train.steps=1", "checkpoint.save_final=false", *extra,
                  f"run.dir={runs[name]}", f"data.path={demo_data}")
        assert r.returncode == 0, r.stderr[-2000:]
    assert "initialised the model weights from" in r.stdout
    # Same batch, same seed: the trained-and-converted weights predict it far better than new ones.
    assert first_loss(runs["converted"]) < first_loss(runs["fresh"]) - 0.5
