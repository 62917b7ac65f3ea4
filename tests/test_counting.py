"""Parameter and FLOP counts from the config alone. Parameters: the Nemotron 3 recipes against the
published numbers (within 1%), and the counter behind `hymoe model info` (hymoe.model.counting)
against models megatron-core actually builds (a small LatentMoE hybrid on CPU, full-size Nano on
the meta device). FLOPs per token (hymoe.model.flops): against a count by hand."""

import json

import pytest
import torch

from hymoe.model import hf
from hymoe.model.config import ModelConfig
from hymoe.model.counting import count_params
from hymoe.model.flops import flops_breakdown, flops_per_token
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
    assert within(info["params_total"] - info["params_mtp"], total), info["params_total"]
    assert within(info["params_active"] - info["params_active_mtp"], active), info["params_active"]
    # Super's MTP layer (two depths sharing it) is one attention + LatentMoE layer more.
    assert (info["params_mtp"] > 0) == (name == "super_120b_a12b")


def test_published_active_counts_without_the_input_embedding():
    # Nano's "3.2B active" and Ultra's "A55B" leave out the input embedding table.
    for name, published in (("nano_30b_a3b", 3.2e9), ("ultra_550b_a55b", 55e9)):
        c = count_params(recipe_model(name), VOCAB, active=True)
        assert within(c["total"] - c["mtp"] - c["embedding"], published), (name, c)
    c = count_params(recipe_model("ultra_550b_a55b"), VOCAB)
    assert within(c["total"] - c["mtp"], 550e9)


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


# h 8; attention 2 heads × 4, 1 KV group; Mamba 2 heads × 4, 1 group, state 3; MoE 4 experts
# top-2 of width 5 at latent 6, shared 7; dense MLP 9; vocab 10.
FLOPS_CFG = ModelConfig(
    pattern="M*E-", hidden_size=8, num_attention_heads=2, num_query_groups=1, head_dim=4,
    ffn_hidden_size=9, mamba_num_heads=2, mamba_head_dim=4, mamba_state_dim=3,
    mamba_num_groups=1, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=5,
    moe_shared_expert_intermediate_size=7, moe_latent_size=6, vocab_size=10,
)
SEQ = 12


def test_flops_of_a_tiny_config_by_hand():
    # Mamba: in_proj 2·8·(2·8 + 2·1·3 + 2) = 384; scan 7·8·3 = 168; out_proj 2·8·8 = 128.
    mamba = 384 + 168 + 128
    # Attention: qkv 2·8·(8 + 2·4) = 256; out 2·8·8 = 128; core 2·2·8·(12/2) = 192.
    attention = 256 + 128 + 192
    # MoE: router 2·8·4 = 64; routed 2 experts · 2·2·6·5 = 240; latent 2·2·8·6 = 192;
    # shared 2·2·8·7 = 224.
    moe = 64 + 240 + 192 + 224
    mlp = 2 * 2 * 8 * 9  # 288
    logits = 2 * 8 * 10  # 160
    b = flops_breakdown(FLOPS_CFG, SEQ)
    assert (b["M"], b["*"], b["E"], b["-"], b["logits"]) == (mamba, attention, moe, mlp, logits)
    forward = mamba + attention + moe + mlp + logits
    assert b["total"] == forward == 2424
    assert flops_per_token(FLOPS_CFG, SEQ, training=False) == forward
    assert flops_per_token(FLOPS_CFG, SEQ) == 3 * forward


def test_mtp_depths_add_their_layers_projection_and_head():
    base = flops_breakdown(FLOPS_CFG, SEQ)
    with_mtp = flops_breakdown(FLOPS_CFG, SEQ, mtp_depths=2, mtp_pattern="*E")
    per_depth = 2 * 2 * 8 * 8 + base["*"] + base["E"] + base["logits"]
    assert with_mtp["mtp"] == 2 * per_depth
    assert with_mtp["total"] == base["total"] + 2 * per_depth


def test_attention_grows_with_sequence_and_latent_shrinks_experts():
    a, b = flops_breakdown(FLOPS_CFG, 100), flops_breakdown(FLOPS_CFG, 200)
    assert b["*"] - a["*"] == 2 * 2 * 8 * 50  # only the core term depends on seq_len
    assert b["M"] == a["M"]  # Mamba is linear in the sequence: constant per token
    plain = ModelConfig(**{**FLOPS_CFG.__dict__, "moe_latent_size": None})
    # Without latent: routed at h=8 (2·2·2·8·5 = 320), no projections.
    assert flops_breakdown(plain, SEQ)["E"] == 64 + 320 + 224


def test_flops_need_a_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        flops_per_token(ModelConfig(), 16)
