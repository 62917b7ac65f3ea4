"""Resume under another parallel layout: a checkpoint saved by one process (tp1·ep1·pp1) is loaded
by 2 processes as tp2·ep2, as pp2 and as pp2 with 3 virtual stages per rank (interleaved: 6 model
chunks of one layer) — megatron-core reshards model and optimizer state on load — and training
continues with the losses of an uninterrupted single-process run (fp32 tolerance)."""

import json
import shutil

import pytest
from helpers import hymoe, hymoe_torchrun

ARGS = ["optim.warmup_steps=1", "logging.progress=false", "logging.wandb=disabled",
        "train.global_batch=4", "train.micro_batch=2", "train.seq_len=32", "train.steps=5"]


def losses(run):
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("reshard")
    straight, saved = base / "straight", base / "saved"
    for run, extra in ((straight, []), (saved, ["train.exit_at_step=2"])):
        r = hymoe("train", "tiny", *ARGS, *extra, f"run.dir={run}", f"data.path={demo_data}")
        assert r.returncode == 0, r.stderr[-2000:]
    return base, straight, saved


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.ep=2"], ["parallel.pp=2"],
                                    ["parallel.pp=2", "parallel.vpp=3"]])
def test_resume_on_another_layout(runs, demo_data, layout):
    base, straight, saved = runs
    run = base / ("resumed_" + "_".join(x.split("=")[0].split(".")[1] for x in layout))
    shutil.copytree(saved, run)
    r = hymoe_torchrun(2, "train", "tiny", *ARGS, *layout, f"run.dir={run}", f"data.path={demo_data}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout
    want, got = losses(straight), losses(run)
    for step in (3, 4, 5):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
