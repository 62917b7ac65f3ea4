"""hymoe.model.hf against Hugging Face transformers' NemotronHForCausalLM (the oracle): a hymoe
model exported with to_hf, and an HF model imported with from_hf, give the same fp32 logits
(max abs diff <= 1e-4) on sequences longer than the Mamba chunk, with LatentMoE, several Mamba
groups, a non-zero routing bias and non-trivial norm weights. One process, CPU."""

import json

import pytest
import torch

from hymoe.model import hf
from hymoe.model.config import ModelConfig

TOL = 1e-4
VOCAB = 128
# Sequence 50 > chunk 16 and not a multiple of it; 4 Mamba groups; top-3 of 8 latent experts.
CFG = ModelConfig(
    pattern="ME*EM-E", hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=16,
    ffn_hidden_size=96, mamba_num_heads=8, mamba_head_dim=16, mamba_state_dim=16,
    mamba_num_groups=4, mamba_chunk_size=16, num_experts=8, moe_router_topk=3,
    moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=48, moe_latent_size=24,
    moe_router_topk_scaling_factor=2.5,
)
HF_KW = dict(
    vocab_size=VOCAB, hidden_size=64,
    layers_block_type=["linear_attention", "moe", "full_attention", "moe", "linear_attention",
                       "mlp", "moe"],
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
    ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=4, chunk_size=16,
    n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48, moe_latent_size=24, routed_scaling_factor=2.5,
)


@pytest.fixture(scope="module")
def transformers_h():
    transformers = pytest.importorskip("transformers")
    return transformers.NemotronHConfig, transformers.NemotronHForCausalLM


def tokens(seed=0, b=2, s=50):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def perturb(model, bias_name):
    """Random init leaves norms at 1 and the routing bias at 0, which would hide a swapped norm
    or a dropped bias: make every 1-D weight and the routing bias distinct."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith(bias_name):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def hymoe_logits(model, tok):
    with torch.no_grad():
        return model.eval()(tok, None, None)


def hf_logits(model, tok):
    with torch.no_grad():
        # use_cache=False: transformers 5.23 fails to build a cache for a model without attention.
        return model.eval()(tok, use_cache=False).logits


def test_to_hf_loads_in_transformers_with_equal_logits(tmp_path, transformers_h):
    _, NemotronH = transformers_h
    model = hf.build_single_process(CFG, VOCAB, seed=3)
    perturb(model, "expert_bias")
    out = hf.to_hf(model, tmp_path / "hf")
    theirs = NemotronH.from_pretrained(out, dtype=torch.float32)
    tok = tokens()
    ours = hymoe_logits(model, tok)
    assert (ours - hf_logits(theirs, tok)).abs().max().item() <= TOL
    assert ours.abs().max() > 0.1  # not a trivially small output
    config = json.loads((out / "config.json").read_text())
    assert config["moe_latent_size"] == 24 and config["hybrid_override_pattern"] == "ME*EM-E"

    # Round trip: the same config and bit-identical weights.
    cfg2, vocab2, state2 = hf.load_hf(out)
    assert vocab2 == VOCAB
    for field in ("pattern", "hidden_size", "moe_latent_size", "mamba_num_groups",
                  "moe_router_topk_scaling_factor", "mamba_dt_min_clamp", "num_query_groups"):
        assert getattr(cfg2, field) == getattr(CFG, field), field
    mine = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert set(state2) == set(mine)
    for k, v in mine.items():
        assert torch.equal(state2[k], v), k


def test_from_hf_of_a_transformers_model_gives_equal_logits(tmp_path, transformers_h):
    NemotronHConfig, NemotronH = transformers_h
    torch.manual_seed(0)
    theirs = NemotronH(NemotronHConfig(**HF_KW))  # time_step_min = 1e-3: HF clamps dt there
    perturb(theirs, "e_score_correction_bias")
    with torch.no_grad():  # push two heads' dt far below the clamp so that the clamp matters
        for layer in theirs.model.layers:
            if layer.block_type == "linear_attention":
                layer.mixer.dt_bias[:2] = -10.0
    theirs.save_pretrained(tmp_path / "hf")
    model = hf.from_hf(tmp_path / "hf")
    assert model.hymoe_model_config.mamba_dt_min_clamp == pytest.approx(1e-3)
    tok = tokens(1)
    expected = hf_logits(theirs, tok)
    assert (hymoe_logits(model, tok) - expected).abs().max().item() <= TOL
    # The comparison is sensitive: without HF's dt clamp the logits move by more than TOL.
    for m in model.modules():
        if hasattr(m, "dt_limit") and hasattr(m, "A_log"):
            m.dt_limit = (0.0, float("inf"))
    assert (hymoe_logits(model, tok) - expected).abs().max().item() > TOL


def test_top1_tied_embeddings_sharded_files(tmp_path, transformers_h):
    """top-1 routing (megatron keeps the sigmoid score: HF needs norm_topk_prob=False), tied
    embeddings, no latent, and a checkpoint split over several safetensors files."""
    _, NemotronH = transformers_h
    cfg = ModelConfig(pattern="M*E", hidden_size=32, num_attention_heads=2, num_query_groups=1,
                      head_dim=16, mamba_num_heads=4, mamba_head_dim=16, mamba_state_dim=8,
                      mamba_num_groups=2, mamba_chunk_size=8, num_experts=4, moe_router_topk=1,
                      moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=16,
                      untie_embeddings_and_output_weights=False)
    model = hf.build_single_process(cfg, VOCAB, seed=5)
    perturb(model, "expert_bias")
    out = hf.to_hf(model, tmp_path / "hf", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    # transformers 5.23 does not tie NemotronH's head itself: the file carries it.
    written = hf.read_hf_state(out)
    assert torch.equal(written["lm_head.weight"], written["backbone.embeddings.weight"])
    theirs = NemotronH.from_pretrained(out, dtype=torch.float32)
    assert theirs.config.norm_topk_prob is False and theirs.config.tie_word_embeddings
    tok = tokens(2, s=21)
    assert (hymoe_logits(model, tok) - hf_logits(theirs, tok)).abs().max().item() <= TOL
    cfg2, _, state2 = hf.load_hf(out)
    assert not cfg2.untie_embeddings_and_output_weights and "output_layer.weight" not in state2
    # A BF16 export keeps the decay parameters and the routing bias in fp32.
    bf16 = hf.read_hf_state(hf.to_hf(model, tmp_path / "bf16", dtype=torch.bfloat16))
    assert bf16["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.bfloat16
    assert bf16["backbone.layers.0.mixer.A_log"].dtype == torch.float32
    assert bf16["backbone.layers.2.mixer.gate.e_score_correction_bias"].dtype == torch.float32


@pytest.mark.parametrize("change, field", [
    ({"n_group": 2, "topk_group": 1}, "n_group"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"mlp_hidden_act": "silu"}, "mlp_hidden_act"),
    ({"model_type": "llama"}, "model_type"),
])
def test_unsupported_hf_configs_are_refused_naming_the_field(change, field):
    config = hf.hf_config(CFG, VOCAB)
    config.update(change)
    with pytest.raises(hf.HFConversionError, match=field):
        hf.model_config_from_hf(config)


def test_qkv_interleave_round_trip():
    """megatron groups q/k/v per KV head; the split is the documented permutation."""
    cfg = ModelConfig(num_attention_heads=4, num_query_groups=2, head_dim=3, hidden_size=5)
    qkv = torch.arange(2 * (2 + 2) * 3 * 5, dtype=torch.float32).reshape(-1, 5)
    q, k, v = hf._qkv_split(qkv, cfg)
    # Group 0 holds q heads 0, 1 then k0, v0; group 1 holds q heads 2, 3 then k1, v1.
    assert torch.equal(q[3:6], qkv[3:6]) and torch.equal(q[6:9], qkv[12:15])
    assert torch.equal(k[:3], qkv[6:9]) and torch.equal(v[3:6], qkv[21:24])
    assert torch.equal(hf._qkv_join(q, k, v, cfg), qkv)
