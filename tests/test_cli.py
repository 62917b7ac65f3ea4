"""The `hymoe` command end to end (subprocesses, as a user runs it): training writes what the
design promises, bad input stops at start-up with one line naming the field, resume continues."""

import json
import math

import pytest
from helpers import hymoe, hymoe_torchrun

BASE = ["train.steps=12", "optim.warmup_steps=2", "train.log_interval=4", "logging.progress=false",
        "train.global_batch=4", "train.micro_batch=2", "train.seq_len=64"]
FAST = BASE + ["logging.wandb=disabled"]


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """12 steps of a 16-step run (train.exit_at_step=12)."""
    run = tmp_path_factory.mktemp("run") / "tiny"
    # wandb at its default (offline): must write its run locally and never touch the network.
    r = hymoe("train", "tiny", *BASE, "logging.wandb=offline", "train.steps=16", "train.exit_at_step=12", f"run.dir={run}",
              f"data.path={demo_data}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run, r


def test_train_writes_metrics_config_and_checkpoint(trained):
    run, r = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == list(range(1, 13))
    for key in ("step", "loss", "lr", "tokens", "grad_norm", "tflops_per_rank", "moe/max_over_mean",
                "moe/layer2/max_over_mean", "moe/layer5/max_over_mean"):
        assert key in rows[0]
    assert all(m["moe/max_over_mean"] >= 1.0 for m in rows)
    # The loader's share of each step: measured, and part of the step's time.
    assert all(0 < m["data/wait_s"] < m["step_time_s"] for m in rows)
    assert rows[-1]["tokens"] == 12 * 4 * 64
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # it learns
    assert "pattern: M*EM-E" in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000012"
    assert "recipe: tiny" in r.stdout  # resolved config printed at start
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run missing"


def test_resume_continues_exactly(trained, demo_data, tmp_path):
    """Run A: stopped at 12 then resumed to 16 (train.resume=auto). Run B: 16 steps straight.
    Steps 13–16 must be identical: model, optimizer, scheduler and data position all restored."""
    run_a, _ = trained
    r = hymoe("train", "tiny", *FAST, "train.steps=16", f"run.dir={run_a}", f"data.path={demo_data}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    run_b = tmp_path / "straight"
    r = hymoe("train", "tiny", *FAST, "train.steps=16", f"run.dir={run_b}", f"data.path={demo_data}")
    assert r.returncode == 0, r.stderr[-3000:]
    a = [json.loads(x) for x in (run_a / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in a] == list(range(1, 17))
    for ma, mb in zip(a[12:], b[12:]):
        assert ma["loss"] == mb["loss"], ma["step"]  # bitwise
        assert ma["lr"] == mb["lr"]


def test_generate_streams_text_and_repeats_with_a_seed(trained, demo_data, tmp_path):
    """`hymoe generate` on the run: the text printed is the prompt and its continuation, the JSON
    lines hold the tokens (decoding to that text), and greedy and seeded sampled continuations are
    the in-process generate()'s (prompt i samples with seed + i)."""
    from hymoe.data import load_tokenizer
    from hymoe.train.eval_model import load_model
    from hymoe.train.generate import Sampling, generate

    run, _ = trained
    prompts = ["def main(", "The"]
    rows = {}
    for name, extra in (("sampled", ["--temperature", "0.9", "--top-k", "50", "--seed", "3"]),
                        ("greedy", [])):
        out = tmp_path / f"{name}.jsonl"
        r = hymoe("generate", str(run), "--prompt", prompts[0], "--prompt", prompts[1],
                  "--max-new-tokens", "6", *extra, "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        rows[name] = [json.loads(x) for x in out.read_text().splitlines()]
        for row in rows[name]:
            assert f"{row['prompt']}{row['completion']}" in r.stdout
            assert len(row["tokens"]) == 6 or row["stop"] == "eod"
    tok = load_tokenizer(demo_data)
    model, _, _ = load_model(run)
    for i, text in enumerate(prompts):
        ids = tok.encode(text).ids
        assert rows["greedy"][i]["tokens"] == generate(model, ids, 6, stop=0)
        assert rows["sampled"][i]["tokens"] == generate(model, ids, 6, Sampling(0.9, 50), seed=3 + i,
                                                        stop=0)
        for name in rows:
            assert tok.decode(rows[name][i]["tokens"]) == rows[name][i]["completion"]
    r = hymoe("generate", str(run), "--prompt", "x", "--top-p", "1.5")
    assert r.returncode == 2 and r.stderr.strip().startswith("hymoe: error: --top-p"), r.stderr


@pytest.mark.parametrize(
    "override, field",
    [
        ("parallel.tp=3", "parallel.tp"),
        ("train.stepz=3", "train.stepz"),
        ("model.pattern=M*X", "model.pattern"),
        ("train.global_batch=3", "train.global_batch"),
        ("precision=fp8", "precision"),
        ("train.eval_interval=5", "train.eval_interval"),  # no data.valid_path
        ("train.eval_iters=0", "train.eval_iters"),
    ],
)
def test_bad_override_is_one_line_naming_the_field(override, field):
    r = hymoe("train", "tiny", override, "--print-config")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("hymoe: error: ") and field in lines[0], lines[0]


def test_missing_data_path_stops_at_start(tmp_path):
    r = hymoe("train", "tiny", *FAST, f"data.path={tmp_path / 'nope'}",
              "data.prepare_demo_if_missing=false", f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.path" in lines[0] and "hymoe data prepare" in lines[0], r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_help_lists_keys():
    r = hymoe("train", "tiny", "--help")
    assert r.returncode == 0
    for key in ("train.steps", "train.resume", "parallel.tp", "precision.recipe", "checkpoint.interval"):
        assert key in r.stdout
    assert "# Optimizer steps to train for" in r.stdout


def test_multirun_sweeps(demo_data, tmp_path):
    r = hymoe("train", "tiny", "-m", "train.steps=2,3", "optim.warmup_steps=1",
              "logging.progress=false", "logging.wandb=disabled", "train.global_batch=2",
              "train.micro_batch=2", "train.seq_len=32", f"data.path={demo_data}",
              "checkpoint.save_final=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(tmp_path.glob("multirun/tiny/*/*/metrics.jsonl"))
    assert [len(p.read_text().splitlines()) for p in runs] == [2, 3]


def test_data_verify_cli(demo_data):
    r = hymoe("data", "verify", str(demo_data), "--workers", "2")
    assert r.returncode == 0 and "match the manifest" in r.stdout
    r = hymoe("data", "verify", str(demo_data), "--workers", "-1")
    assert r.returncode == 2 and "--workers: must be >= 0" in r.stderr


def test_nvfp4_mtp_resume_repeats_stochastic_rounding(demo_data, tmp_path):
    """Emulated NVFP4 draws stochastic-rounding noise each step; a resumed run must draw the same.
    With two Multi-Token Prediction depths sharing one layer (Nemotron 3 Super's arrangement)."""
    args = [*FAST, "precision=nvfp4", "train.steps=6", f"data.path={demo_data}",
            "model.pattern=M*EM-E/*E/*E", "model.mtp_shared_layer=true"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert hymoe("train", "tiny", *args, "train.exit_at_step=4", f"run.dir={a}").returncode == 0
    r = hymoe("train", "tiny", *args, f"run.dir={a}")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert hymoe("train", "tiny", *args, f"run.dir={b}").returncode == 0
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "mtp_loss/depth1", "mtp_loss/depth2"):
        assert [m[key] for m in ma] == [m[key] for m in mb], key  # bitwise


@pytest.mark.distributed
@pytest.mark.parametrize("vpp", [1, 3])
def test_mtp_under_pipeline_parallelism_trains_and_resumes(demo_data, tmp_path, vpp):
    """An MTP depth on the last of two pipeline stages (with vpp=3: the last of six one-layer
    chunks), with tied embeddings: that stage embeds MTP's tokens with its copy of the embedding
    (also its output weight), rank 0 (the first stage) logs the MTP loss, and the checkpoint, where
    the copy is a replica of the first stage's embedding, resumes."""
    run = tmp_path / "run"
    args = ["train", "tiny", *FAST, "train.steps=3", "parallel.pp=2", f"parallel.vpp={vpp}",
            "model.pattern=M*EM-E/*E", "model.untie_embeddings_and_output_weights=false",
            f"run.dir={run}", f"data.path={demo_data}"]
    r = hymoe_torchrun(2, *args, "train.exit_at_step=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = hymoe_torchrun(2, *args)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert all(math.isfinite(m["mtp_loss/depth1"]) for m in rows)


def test_nvfp4_telemetry_files(demo_data, tmp_path):
    run = tmp_path / "tel"
    r = hymoe("train", "tiny", *FAST, "precision=nvfp4", "train.steps=4", "precision.telemetry_interval=2",
              f"run.dir={run}", f"data.path={demo_data}", "checkpoint.save_final=false")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (run / "precision_telemetry.rank0.jsonl").read_text().splitlines()]
    assert {row["step"] for row in rows} == {2, 4}
    layers = {row["layer"] for row in rows}
    assert any("mixer.in_proj" in name for name in layers)  # an NVFP4 layer
    assert any("mixer.out_proj" in name for name in layers)  # the MXFP8 one
    assert (run / "precision_telemetry_summary.json").exists()


def test_sweep_points_are_the_cartesian_product_named_by_values():
    from hymoe.train.sweep import sweep_points

    points = sweep_points(["precision=bf16,nvfp4", "train.steps=3", "optim.lr=1e-3,2e-3"])
    assert [name for name, _ in points] == ["bf16_0.001", "bf16_0.002", "nvfp4_0.001", "nvfp4_0.002"]
    assert points[1][1] == ["precision=bf16", "train.steps=3", "optim.lr=0.002"]
    assert sweep_points(["train.steps=3"]) == [("0", ["train.steps=3"])]
