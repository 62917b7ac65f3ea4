"""megatron-core on CPU over gloo: TP=2, EP=2 (alltoall), PP=2 (1F1B; and interleaved, 2 virtual
stages per rank), CP=2 and DP=2 with the distributed optimizer, and the 4-process mixes TP2·EP2,
PP2·DP2 and CP2·TP2, each train the tiny hybrid MoE (Mamba + attention + MoE + MLP) to the same
per-step losses and grad norms as one process, from the same initial weights (a dist-checkpoint
resharded on load). The first step's gradients are compared per parameter kind as well.
Context-parallel layouts also run with packed documents (Mamba state resets and attention masks
across the CP split; MTP kept within documents), and every layout also with LatentMoE and two
Multi-Token Prediction depths (per-depth MTP losses included; under PP the last stage, with virtual
stages its last chunk, embeds MTP's tokens with its copy of the embedding)."""

import json

import pytest
from helpers import REPO, torchrun

WORKER = REPO / "tests" / "distributed" / "equality_worker.py"
RTOL = 1e-5
TWO = ["tp2", "ep2", "pp2", "pp2_vpp2", "dp2_distopt", "cp2"]
FOUR = ["tp2_ep2", "pp2_dp2", "cp2_tp2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("equality")
    torchrun(WORKER, 1, "reference", str(work))
    # All layouts of one size in one launch: start-up dominates these runs.
    torchrun(WORKER, 2, "layouts", str(work), ",".join(TWO))
    torchrun(WORKER, 4, "layouts4", str(work), ",".join(FOUR))
    refs = json.loads((work / "reference.json").read_text())
    layouts = json.loads((work / "layouts.json").read_text())
    layouts.update(json.loads((work / "layouts4.json").read_text()))
    return refs, layouts


def _reference(name: str) -> str:
    for suffix in ("_docs_mtp", "_mtp", "_docs"):
        if name.endswith(suffix):
            return "reference" + suffix
    return "reference"


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    TWO + FOUR + ["cp2_docs", "cp2_tp2_docs", "cp2_docs_mtp", "cp2_tp2_docs_mtp"]
    + [f"{name}_mtp" for name in TWO + FOUR],
)
def test_layout_matches_single_process(results, layout):
    refs, layouts = results
    ref = refs[_reference(layout)]
    got = layouts[layout]
    assert len(got) == len(ref) == 3
    for step, (a, b) in enumerate(zip(got, ref)):
        assert a["tokens"] == b["tokens"]
        # Loss, grad norm, and each MTP depth's loss (moe/* aux-loss logs are this rank's view).
        for key in [k for k in b if not k.startswith("moe/") and k != "grads"]:
            assert a[key] == pytest.approx(b[key], rel=RTOL), (layout, step, key)
    if "grads" in got[0]:  # not with the distributed optimizer: its grads are sharded
        want = ref[0]["grads"]
        assert got[0]["grads"].keys() == want.keys()
        for kind, norm in want.items():
            assert got[0]["grads"][kind] == pytest.approx(norm, rel=RTOL), (layout, kind)
    # The model learns something in 3 steps, so equal losses are not equal constants.
    assert ref[0]["loss"] != ref[2]["loss"]
