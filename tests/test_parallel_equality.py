"""megatron-core on CPU over gloo: TP=2, EP=2 (alltoall), PP=2 (1F1B) and DP=2 with the distributed
optimizer each train the tiny hybrid MoE (Mamba + attention + MoE + MLP) to the same per-step losses
and grad norms as one process, from the same initial weights (a dist-checkpoint resharded on load);
and so does the same model with two Multi-Token Prediction depths (per-depth MTP losses included)."""

import json

import pytest
from helpers import REPO, torchrun

WORKER = REPO / "tests" / "distributed" / "equality_worker.py"
RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("equality")
    torchrun(WORKER, 1, "reference", str(work))
    # All 2-process layouts in one launch: start-up dominates these runs.
    torchrun(WORKER, 2, "layouts", str(work))
    refs = json.loads((work / "reference.json").read_text())
    layouts = json.loads((work / "layouts.json").read_text())
    return refs, layouts


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout", ["tp2", "ep2", "pp2", "dp2_distopt", "ep2_mtp", "dp2_distopt_mtp"]
)
def test_layout_matches_single_process(results, layout):
    refs, layouts = results
    ref = refs["reference_mtp" if layout.endswith("_mtp") else "reference"]
    got = layouts[layout]
    assert len(got) == len(ref) == 3
    for step, (a, b) in enumerate(zip(got, ref)):
        assert a["tokens"] == b["tokens"]
        # Loss, grad norm, and each MTP depth's loss (moe/* aux-loss logs are this rank's view).
        for key in [k for k in b if not k.startswith("moe/")]:
            assert a[key] == pytest.approx(b[key], rel=RTOL), (layout, step, key)
    # The model learns something in 3 steps, so equal losses are not equal constants.
    assert ref[0]["loss"] != ref[2]["loss"]
