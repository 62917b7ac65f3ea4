"""Exact resume end to end: N steps straight equal k steps + resume + (N−k) steps bitwise for the
tiny hybrid MoE with a Multi-Token Prediction depth and two reader worker processes, in BF16 (fp32
compute on CPU) and in emulated NVFP4 with stochastic rounding. The split run writes its
checkpoints in the background (checkpoint.async_save) and the straight one synchronously: training
must not notice the background writer, and both write the same checkpoint."""

import json
import pickle

import pytest
import torch
from helpers import hymoe, hymoe_torchrun

ARGS = ["optim.warmup_steps=1", "logging.progress=false", "logging.wandb=disabled",
        "train.global_batch=2", "train.micro_batch=2", "train.seq_len=32", "train.steps=6",
        "checkpoint.interval=2", "checkpoint.keep_last=0", "model.pattern=M*EM-E/*E",
        "data.num_workers=2"]
KEYS = ("loss", "mtp_loss/depth1", "grad_norm", "lr", "tokens")


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_checkpoint(a, b):
    """Same files with the same bytes, except two whose bytes hold a random id per write: torch's
    DCP ``.metadata`` (a save id and the folder's path) and ``torch.save``'s serialization id in
    the RNG files. Their contents must be equal."""
    ma, mb = (json.loads((p / "hymoe.json").read_text()) for p in (a, b))
    fa, fb = ma.pop("files"), mb.pop("files")
    assert ma == mb  # step, tokens, every rank's data position, scheduler, model config
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name == ".metadata":
            da, db = (pickle.loads((p / name).read_bytes()) for p in (a, b))
            assert da.state_dict_metadata == db.state_dict_metadata
            assert da.storage_data == db.storage_data
        elif name.startswith("rng_rank"):
            ra, rb = (torch.load(p / name, weights_only=False) for p in (a, b))
            assert torch.equal(ra["torch_rng"], rb["torch_rng"])
            assert [s and s["state"].tolist() for s in ra.get("sr_rngs", [])] == \
                   [s and s["state"].tolist() for s in rb.get("sr_rngs", [])]
        else:
            assert fa[name] == fb[name], name  # sha256 and size: the same bytes


@pytest.mark.parametrize("precision", ["bf16", "nvfp4"])
def test_async_saved_split_run_equals_straight_run_bitwise(demo_data, tmp_path, precision):
    common = [*ARGS, f"precision={precision}", f"data.path={demo_data}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = hymoe("train", "tiny", *common, f"run.dir={straight}")
    assert r.returncode == 0, r.stderr[-3000:]
    background = [*common, "checkpoint.async_save=true", f"run.dir={split}"]
    r = hymoe("train", "tiny", *background, "train.exit_at_step=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_00000004 in the background" in r.stdout
    r = hymoe("train", "tiny", *background)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_00000004" in r.stdout
    a, b = metrics(straight), metrics(split)
    assert [m["step"] for m in b] == list(range(1, 7))
    for key in KEYS:
        assert [m[key] for m in a] == [m[key] for m in b], key  # bitwise, before and after resume
    if precision == "nvfp4":
        rng = torch.load(split / "checkpoints" / "step_00000004" / "rng_rank00000.pt",
                         weights_only=False)
        assert rng["sr_rngs"][0] is not None  # the stochastic-rounding stream is in the checkpoint
    for step in ("step_00000002", "step_00000004", "step_00000006"):
        assert_same_checkpoint(straight / "checkpoints" / step, split / "checkpoints" / step)


@pytest.mark.distributed
def test_async_save_on_two_ranks_writes_the_sync_checkpoint(demo_data, tmp_path):
    """Two ranks (ep2): finalizing is collective (all ranks poll at the same step, megatron
    gathers the write results, rank 0 renames); training and checkpoint bytes equal a sync run."""
    common = [*(x for x in ARGS if not x.startswith(("train.global_batch", "data.num_workers"))),
              "parallel.ep=2", "train.global_batch=4", "data.num_workers=1",
              f"data.path={demo_data}"]
    sync, background = tmp_path / "sync", tmp_path / "async"
    for run, extra in ((sync, []), (background, ["checkpoint.async_save=true"])):
        r = hymoe_torchrun(2, "train", "tiny", *common, *extra, f"run.dir={run}")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "step_00000004 (written in the background)" in r.stdout
    a, b = metrics(sync), metrics(background)
    for key in KEYS:
        assert [m[key] for m in a] == [m[key] for m in b], key
    for step in ("step_00000002", "step_00000004", "step_00000006"):
        assert_same_checkpoint(sync / "checkpoints" / step, background / "checkpoints" / step)
