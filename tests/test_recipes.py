"""Every recipe composes, validates and builds its megatron-core model on CPU; the config-only
parameter counter and linear-layer list (used by `hymoe model info` / `precision show`) agree with
the built model, and so does the precision plan."""

import json
import subprocess
import sys

import pytest

from hymoe.model.counting import count_params, linear_layer_names
from hymoe.precision.policy import decide, layer_index
from hymoe.train.config import validate
from hymoe.train.recipe import list_recipes, load_recipe
from helpers import REPO


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "built.json"
    subprocess.run([sys.executable, str(REPO / "tests/distributed/build_worker.py"), str(out)],
                   check=True, timeout=600)
    return json.loads(out.read_text())


def test_recipes_present():
    assert {"tiny", "tiny_gpu"} <= set(list_recipes())


@pytest.mark.parametrize("recipe", list_recipes())
def test_recipe_counts_match_built_model(built, recipe):
    cfg = load_recipe(recipe, ["precision=nvfp4", "data.path=unused", "parallel=single"])
    validate(cfg, 1)  # the recipe's own layout is checked at its world size in test_long_context.py
    b = built[recipe]
    assert count_params(cfg.model, b["vocab"])["total"] == b["params"]
    names = [name for name, _, _ in b["plan"]]
    assert sorted(names) == sorted(linear_layer_names(cfg.model))
    # The plan the trainer applies equals what `hymoe precision show` prints.
    for name, fmt, why in b["plan"]:
        assert [fmt, why] == list(decide(name, layer_index(name), cfg.model.num_layers, cfg.precision))


def test_tiny_gpu_is_one_gpu_sized(built):
    assert 100e6 <= built["tiny_gpu"]["params"] - 2 * 512 * 768 <= 300e6


def test_nvfp4_policy_defaults():
    cfg = load_recipe("tiny", ["precision=nvfp4", "data.path=unused"])
    plan = {n: decide(n, layer_index(n), cfg.model.num_layers, cfg.precision)[0]
            for n in linear_layer_names(cfg.model)}
    assert plan["decoder.layers.0.mixer.in_proj"] == "nvfp4"
    assert plan["decoder.layers.0.mixer.out_proj"] == "mxfp8"
    assert plan["decoder.layers.1.self_attention.linear_qkv"] == "bf16"
    assert plan["decoder.layers.2.mlp.experts.local_experts.0.linear_fc1"] == "nvfp4"
    assert plan["decoder.layers.4.mlp.linear_fc1"] == "nvfp4"
    # Last 15% of 6 layers = the last layer.
    assert plan["decoder.layers.5.mlp.shared_experts.linear_fc1"] == "bf16"
    assert plan["output_layer"] == "bf16"
