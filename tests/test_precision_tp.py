"""The emulated NVFP4 GEMMs inside megatron-core's tensor-parallel linears (TP=1, TP=2, TP=2 with
sequence parallelism; RHT off and on) give, bit for bit, the output and gradients of a
single-process reference written from the contract — with each operand quantized as the local GEMM
sees it (per-shard amax for sharded weights and gradients, the gathered tensor's amax for a
sequence-parallel input), which is what Transformer Engine does (docs/precision.md)."""

import json

import pytest
from helpers import REPO, torchrun

WORKER = REPO / "tests" / "distributed" / "precision_tp_worker.py"
CASES = ["tp1", "tp1_rht", "tp2", "tp2_rht", "tp2_sp", "tp2_sp_rht"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("precision_tp")
    # Every case in one 2-process launch (start-up dominates); TP=1 runs on both ranks (dp=2).
    torchrun(WORKER, 2, str(work), ",".join(CASES))
    return [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_tp_linears_match_the_contract_reference(results, case):
    for rank, res in enumerate(results):
        got = res[case]
        assert got["equal"], (rank, case, {k: got[k] for k in ("y", "dx", "dw1", "dw2")})
        # Every quantized operand of both layers reported to the telemetry under its layer name.
        assert len(got["telemetry_rows"]) == 10 and got["telemetry_rows"][0] == "col:dgrad:dy"
        if case.startswith("tp2"):
            # Per-shard quantization is a real choice: quantizing the full weights gives other bits.
            assert got["differs_from_full_tensor_quantization"], (rank, case)
