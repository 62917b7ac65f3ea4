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
    # The run folder names its latest checkpoint, as for `hymoe eval` and `generate`.
    r = hymoe("convert", "to-hf", str(trained), str(tmp_path / "hf"), "--dtype", "fp32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "converting layers" in r.stderr and "9/9" in r.stderr  # the bar: 6 layers + 3 others
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h"
    r = hymoe("convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr[-2000:]
    # Converted weights export again (their model.yaml stands for hymoe.json), bit for bit.
    r = hymoe("convert", "to-hf", str(tmp_path / "back"), str(tmp_path / "hf2"), "--dtype", "fp32")
    assert r.returncode == 0, r.stderr[-2000:]
    from hymoe.model.hf import read_hf_state

    a, b = read_hf_state(tmp_path / "hf"), read_hf_state(tmp_path / "hf2")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    runs = {}
    for name, extra in (("fresh", []), ("converted", [f"checkpoint.init_weights={tmp_path / 'back'}"])):
        runs[name] = tmp_path / name
        r = hymoe("train", "tiny", *ARGS, "train.steps=1", "checkpoint.save_final=false", *extra,
                  f"run.dir={runs[name]}", f"data.path={demo_data}")
        assert r.returncode == 0, r.stderr[-2000:]
    assert "initialised the model weights from" in r.stdout
    # Same batch, same seed: the trained-and-converted weights predict it far better than new ones.
    assert first_loss(runs["converted"]) < first_loss(runs["fresh"]) - 0.5


def test_from_hf_mtp_depths_goes_into_model_yaml(tmp_path, monkeypatch):
    """Nemotron 3 Super's config.json records one shared MTP block and not its 2 training depths;
    `--mtp-depths 2` must reach the pattern in model.yaml, which training reads. In-process and
    with a tiny model, so it costs seconds."""
    from omegaconf import OmegaConf

    from hymoe.cli import cmd_convert
    from hymoe.model import hf
    from hymoe.model.config import ModelConfig

    cfg = ModelConfig(pattern="M*-/*-", mtp_shared_layer=True, hidden_size=32,
                      num_attention_heads=2, num_query_groups=2, head_dim=16, ffn_hidden_size=48,
                      mamba_num_heads=4, mamba_head_dim=16, mamba_state_dim=8,
                      mamba_num_groups=1, mamba_chunk_size=16)
    hf.to_hf(hf.build_single_process(cfg, 64), tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("mtp_num_layers", "mtp_use_repeated_layer"):  # as in Super's released config
        del config[key]
    config_file.write_text(json.dumps(config))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")  # cmd_convert sets it; restored after the test
    cmd_convert(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out"), "--mtp-depths", "2"])
    written = OmegaConf.to_container(OmegaConf.load(tmp_path / "out" / "model.yaml"))
    got = ModelConfig(**written)
    assert got.pattern == "M*-/*-/*-" and got.mtp_depths == ("*-", "*-") and got.mtp_shared_layer
