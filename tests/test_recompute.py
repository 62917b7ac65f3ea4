"""Activation recompute (train.recompute) changes memory, never the math: selective (megatron-core's
recompute modules) and full (hymoe's, every layer including Mamba) train the tiny hybrid MoE with
LatentMoE and packed documents to bit-identical losses, grad norms, MoE aux-loss logs and
first-step gradients as no recompute — in one process and with pp=2, where 1F1B runs a layer's
recomputation after the next microbatch's forward."""

import json

import pytest
from helpers import REPO, torchrun

WORKER = REPO / "tests" / "distributed" / "recompute_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("recompute")
    out = {}
    for n in (1, 2):
        torchrun(WORKER, n, str(work), cwd=REPO / "tests" / "distributed")
        out[n] = json.loads((work / f"recompute_pp{n}.json").read_text())
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_is_bitwise_the_same_training(results, pp, mode):
    base, got = results[pp]["none"], results[pp][mode]
    # It does recompute: full keeps only layer inputs for the backward; selective keeps other
    # tensors (the recomputed modules' inputs — at these toy sizes not fewer bytes).
    kept = {m: results[pp][m][0].get("saved_bytes") for m in ("none", "selective", "full")}
    assert kept["full"] < 0.1 * kept["none"] and kept["selective"] != kept["none"], kept
    got, base = ([{k: v for k, v in s.items() if k != "saved_bytes"} for s in r] for r in (got, base))
    assert got == base
    assert base[0]["loss"] != base[2]["loss"]
    assert any(k.startswith("moe/") for k in base[0])  # the aux-loss log is compared too


@pytest.mark.parametrize("overrides, message", [
    (["train.recompute=some"], "train.recompute: must be none, selective or full, got 'some'"),
    (["train.recompute=selective", "train.recompute_modules=[layernorm]"],
     r"train.recompute_modules: \['layernorm'\]: choose from core_attn, mlp, moe, shared_experts"),
])
def test_bad_recompute_settings_fail_at_start_up(overrides, message):
    from hymoe.train.config import ConfigError, validate
    from hymoe.train.recipe import load_recipe

    with pytest.raises(ConfigError, match=message):
        validate(load_recipe("tiny", overrides), 1)
