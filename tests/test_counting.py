"""Parameter counts of the Nemotron 3 recipes against the published numbers (within 1%), and the
config-only counter (hymoe.model.counting, used by `hymoe model info`) against models megatron-core
actually builds: a small LatentMoE hybrid on CPU, and full-size Nano on the meta device."""

import json

import pytest
import torch

from hymoe.model import hf
from hymoe.model.config import ModelConfig
from hymoe.model.counting import count_params
from hymoe.train.inspect import model_info
from hymoe.train.recipe import load_recipe

VOCAB = 131072


def recipe_model(name):
    return load_recipe(name, []).model


def within(value, published, rel=0.01):
    return abs(value - published) <= rel * published


@pytest.mark.parametrize("name, total, active", [
    ("nano_30b_a3b", 31.6e9, 3.6e9),  # active counts both embedding tables
    ("super_120b_a12b", 120.6e9, 12.7e9),  # without the MTP layer
])
def test_published_counts_via_model_info(name, total, active):
    info = json.loads(model_info(name, [], as_json=True))
    assert info["vocab_size"] == VOCAB
    assert within(info["params_total"], total), info["params_total"]
    assert within(info["params_active"], active), info["params_active"]


def test_published_active_counts_without_the_input_embedding():
    # Nano's "3.2B active" and Ultra's "A55B" leave out the input embedding table.
    for name, published in (("nano_30b_a3b", 3.2e9), ("ultra_550b_a55b", 55e9)):
        c = count_params(recipe_model(name), VOCAB, active=True)
        assert within(c["total"] - c["embedding"], published), (name, c)
    assert within(count_params(recipe_model("ultra_550b_a55b"), VOCAB)["total"], 550e9)


def test_layer_mix_of_the_recipes():
    for name, mix in (("nano_30b_a3b", (23, 23, 6)), ("super_120b_a12b", (40, 40, 8)),
                      ("ultra_550b_a55b", (48, 48, 12))):
        layers = recipe_model(name).layer_pattern
        assert (layers.count("M"), layers.count("E"), layers.count("*")) == mix, name
    assert recipe_model("nano_30b_a3b").moe_latent_size is None
    assert recipe_model("super_120b_a12b").moe_latent_size == 1024
    assert recipe_model("ultra_550b_a55b").moe_latent_size == 2048


def test_latent_moe_count_by_hand():
    cfg = ModelConfig(pattern="E", hidden_size=10, num_experts=4, moe_router_topk=2,
                      moe_ffn_hidden_size=3, moe_shared_expert_intermediate_size=5,
                      moe_latent_size=6)
    # norm 10 + router 4·10 + experts 4·2·6·3 + shared 2·10·5 + latent 2·10·6
    assert count_params(cfg, 7)["by_type"]["E"] == 10 + 40 + 144 + 100 + 120
    assert count_params(cfg, 7, active=True)["by_type"]["E"] == 10 + 40 + 72 + 100 + 120


def test_counter_equals_built_latent_model():
    cfg = ModelConfig(pattern="ME*E-", moe_latent_size=24, num_experts=6, moe_router_topk=2)
    model = hf.build_single_process(cfg, 100)
    assert count_params(cfg, 100)["total"] == sum(p.numel() for p in model.parameters())


def test_counter_equals_megatron_model_built_on_meta(name="nano_30b_a3b"):
    """The full-size model, built by megatron-core on the meta device (no memory, ~1 s; Super
    and Ultra match exactly too, in ~5-8 s each: left to the recipe build test)."""
    from hymoe.model.build import build_model, build_transformer_config

    cfg = recipe_model(name)
    hf.build_single_process(ModelConfig(pattern="M"), 8)  # a world of one with megatron's groups
    with torch.device("meta"):
        tconfig = build_transformer_config(cfg, params_dtype=torch.bfloat16,
                                           perform_initialization=False)
        model = build_model(cfg, tconfig, vocab_size=VOCAB)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg, VOCAB)["total"]
