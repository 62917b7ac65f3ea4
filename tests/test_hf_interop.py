"""hymoe.model.hf against Hugging Face transformers' NemotronHForCausalLM (the oracle): a hymoe
model exported with to_hf, and an HF model imported with from_hf, give the same fp32 logits
(max abs diff <= 1e-4) on sequences longer than the Mamba chunk, with LatentMoE, several Mamba
groups, a non-zero routing bias and non-trivial norm weights. One process, CPU. The config.json
rules (hymoe.model.hf_config) are tested here too: what is refused, and MTP depths."""

import json

import pytest
import torch

from hymoe.model import hf, hf_config
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
    config = hf_config.hf_config(CFG, VOCAB)
    config.update(change)
    with pytest.raises(hf_config.HFConversionError, match=field):
        hf_config.model_config_from_hf(config)


def test_qkv_interleave_round_trip():
    """megatron groups q/k/v per KV head; the split is the documented permutation."""
    cfg = ModelConfig(num_attention_heads=4, num_query_groups=2, head_dim=3, hidden_size=5)
    qkv = torch.arange(2 * (2 + 2) * 3 * 5, dtype=torch.float32).reshape(-1, 5)
    q, k, v = hf._qkv_split(qkv, cfg)
    # Group 0 holds q heads 0, 1 then k0, v0; group 1 holds q heads 2, 3 then k1, v1.
    assert torch.equal(q[3:6], qkv[3:6]) and torch.equal(q[6:9], qkv[12:15])
    assert torch.equal(k[:3], qkv[6:9]) and torch.equal(v[3:6], qkv[21:24])
    assert torch.equal(hf._qkv_join(q, k, v, cfg), qkv)


# ---------------------------------------------------------------------------------------------
# Multi-Token Prediction: mtp.* as the released Nemotron 3 Super checkpoint names it
# ---------------------------------------------------------------------------------------------
def _mtp_cfg(depth, shared):
    from dataclasses import replace

    return replace(CFG, pattern=f"{CFG.pattern}/{depth}/{depth}", mtp_shared_layer=shared,
                   mtp_loss_scale=0.25)


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_mtp_losses(NemotronH, theirs, hf_dir, tmp_path, tok, labels, depths):
    """Per-depth MTP loss sums computed from the exported tensors the way vLLM's nemotron_h_mtp
    runs them, with transformers' own layers: depth k feeds eh_proj([enorm(emb(t_{i+k})),
    hnorm(h_i)]) through HF layers mtp.layers.{2p}, {2p+1} (+ final_layernorm), then lm_head.
    Each block is loaded by transformers as a 2-layer nemotron_h whose norm_f is final_layernorm."""
    config = json.loads((hf_dir / "config.json").read_text())
    written = hf.read_hf_state(hf_dir)
    block, blocks = config["mtp_layers_block_type"], config["num_nextn_predict_layers"]
    head_cfg = {k: v for k, v in config.items()
                if k not in ("hybrid_override_pattern", "num_hidden_layers")}
    head_cfg.update(layers_block_type=block, num_nextn_predict_layers=0)
    heads = []
    for p in range(blocks):
        folder = tmp_path / f"mtp_head_{p}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(head_cfg))
        tensors = {"backbone.embeddings.weight": written["backbone.embeddings.weight"],
                   "lm_head.weight": written["lm_head.weight"],
                   "backbone.norm_f.weight":
                       written[f"mtp.layers.{2 * p + 1}.final_layernorm.weight"]}
        for j in range(2):
            prefix = f"mtp.layers.{2 * p + j}."
            tensors.update({f"backbone.layers.{j}." + k[len(prefix):]: v
                            for k, v in written.items() if k.startswith(prefix)
                            and k.split(".")[3] in ("norm", "mixer")})
        hf._write_safetensors(tensors.items(), folder, 2**40)
        heads.append(NemotronH.from_pretrained(folder, dtype=torch.float32).eval())
    eps, s = config["layer_norm_epsilon"], tok.shape[1]
    losses = []
    with torch.no_grad():
        hidden = theirs.model(tok, use_cache=False).last_hidden_state  # after norm_f
        for k in range(1, depths + 1):
            p = 0 if blocks == 1 else k - 1  # a shared block runs at every depth
            pre = f"mtp.layers.{2 * p}."
            emb = written["backbone.embeddings.weight"][torch.roll(tok, -k, dims=1)]
            x = torch.cat([rms(emb, written[pre + "enorm.weight"], eps),
                           rms(hidden, written[pre + "hnorm.weight"], eps)], dim=-1)
            x = x @ written[pre + "eh_proj.weight"].T
            hidden = heads[p].model(inputs_embeds=x, use_cache=False).last_hidden_state
            logits = heads[p].lm_head(hidden)
            # Position i predicts token i+k+1 (= labels[i+k]); the last k positions have none.
            losses.append(torch.nn.functional.cross_entropy(
                logits[:, :s - k].reshape(-1, VOCAB), labels[:, k:].reshape(-1), reduction="sum"))
    return torch.stack(losses)


def hymoe_losses(model, tok, labels):
    model.mtp_report.zero_()
    with torch.no_grad():
        loss = model.eval()(tok, None, None, labels=labels)
    return loss, model.mtp_report.clone()


@pytest.mark.parametrize("depth, shared", [("*E", True), ("*-", False)])
def test_mtp_export_round_trip_and_transformers(tmp_path, transformers_h, depth, shared):
    """Super's MTP (2 depths of one shared attention + LatentMoE block) and 2 independent
    attention + MLP blocks: names and config as the released checkpoints have them; transformers
    still loads the folder with the same logits; the round trip is bitwise (weights and MTP
    losses); the exported MTP computes, in transformers' layers, the losses hymoe trains."""
    _, NemotronH = transformers_h
    cfg = _mtp_cfg(depth, shared)
    model = hf.build_single_process(cfg, VOCAB, seed=11)
    perturb(model, "expert_bias")
    out = hf.to_hf(model, tmp_path / "hf")

    config = json.loads((out / "config.json").read_text())
    blocks = 1 if shared else 2
    assert config["num_nextn_predict_layers"] == blocks  # physical blocks, as Super's config says
    assert config["mtp_hybrid_override_pattern"] == depth
    assert config["mtp_layers_block_type"] == ["full_attention", "moe" if depth == "*E" else "mlp"]
    assert config["mtp_use_repeated_layer"] is shared and config["mtp_num_layers"] == 2
    written = hf.read_hf_state(out)
    last = 2 * blocks - 1
    for name in ("mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight",
                 "mtp.layers.0.eh_proj.weight", "mtp.layers.0.norm.weight",
                 "mtp.layers.0.mixer.q_proj.weight", "mtp.layers.0.mixer.o_proj.weight",
                 f"mtp.layers.{last}.norm.weight", f"mtp.layers.{last}.final_layernorm.weight"):
        assert name in written, name
    if depth == "*E":
        for name in ("mixer.gate.e_score_correction_bias", "mixer.experts.7.up_proj.weight",
                     "mixer.fc1_latent_proj.weight", "mixer.shared_experts.down_proj.weight"):
            assert f"mtp.layers.1.{name}" in written, name
    else:
        assert "mtp.layers.3.mixer.up_proj.weight" in written
    assert {int(k.split(".")[2]) for k in written if k.startswith("mtp.")} == set(range(2 * blocks))
    assert written["mtp.layers.0.eh_proj.weight"].shape == (64, 128)

    theirs = NemotronH.from_pretrained(out, dtype=torch.float32).eval()  # ignores mtp.*
    tok = tokens(4, s=30)
    assert (hymoe_logits(model, tok) - hf_logits(theirs, tok)).abs().max().item() <= TOL

    back = hf.from_hf(out)
    got = back.hymoe_model_config
    assert (got.pattern, got.mtp_shared_layer, got.mtp_loss_scale) == (cfg.pattern, shared, 0.25)
    mine = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    theirs_back = {k: v for k, v in back.state_dict().items() if not k.endswith("_extra_state")}
    assert set(mine) == set(theirs_back)
    for k, v in mine.items():
        assert torch.equal(theirs_back[k], v), k
    labels = tokens(5, s=30)
    loss, report = hymoe_losses(model, tok, labels)
    loss2, report2 = hymoe_losses(back, tok, labels)
    assert torch.equal(loss, loss2) and torch.equal(report, report2)
    assert report[:, 1].tolist() == [2 * 29, 2 * 28]  # tokens per depth: the last k have no target

    expected = reference_mtp_losses(NemotronH, theirs, out, tmp_path, tok, labels, depths=2)
    assert torch.allclose(report[:, 0].float(), expected, rtol=1e-5, atol=1e-4), (report, expected)
    # The comparison is sensitive: swapping the embedding and hidden-state norms moves it.
    written["mtp.layers.0.enorm.weight"], written["mtp.layers.0.hnorm.weight"] = (
        written["mtp.layers.0.hnorm.weight"], written["mtp.layers.0.enorm.weight"])
    hf._write_safetensors(written.items(), out, 2**40)
    (tmp_path / "swapped").mkdir()
    swapped = reference_mtp_losses(NemotronH, theirs, out, tmp_path / "swapped", tok, labels,
                                   depths=2)
    assert not torch.allclose(report[:, 0].float(), swapped, rtol=1e-5, atol=1e-4)


def test_mtp_config_of_the_released_super_checkpoint():
    """Super's config.json has num_nextn_predict_layers=1 and mtp_hybrid_override_pattern="*E"
    and nothing about its 2 training depths: one shared block, one depth unless asked for more."""
    config = hf_config.hf_config(CFG, VOCAB)
    config.update(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")
    cfg, _ = hf_config.model_config_from_hf(config)
    assert cfg.pattern == CFG.pattern + "/*E" and cfg.mtp_shared_layer
    cfg, _ = hf_config.model_config_from_hf(config, mtp_depths=2)
    assert cfg.pattern == CFG.pattern + "/*E/*E" and cfg.mtp_shared_layer


@pytest.mark.parametrize("change, field", [
    ({"num_nextn_predict_layers": 2, "mtp_hybrid_override_pattern": "*E",
      "mtp_use_repeated_layer": True}, "mtp_use_repeated_layer"),
    ({"num_nextn_predict_layers": 1}, "mtp_hybrid_override_pattern"),
    ({"num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "E"},
     "mtp_hybrid_override_pattern"),
    ({"num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*E",
      "mtp_layers_block_type": ["full_attention", "mlp"]}, "mtp_layers_block_type"),
    ({"num_nextn_predict_layers": 2, "mtp_hybrid_override_pattern": "*E",
      "mtp_num_layers": 3}, "mtp_num_layers"),
])
def test_unsupported_mtp_configs_are_refused_naming_the_field(change, field):
    config = hf_config.hf_config(CFG, VOCAB)
    config.update(change)
    with pytest.raises(hf_config.HFConversionError, match=field):
        hf_config.model_config_from_hf(config)
