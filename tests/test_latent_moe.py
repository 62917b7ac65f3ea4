"""LatentMoE (hymoe.model.latent_moe) on megatron-core's MoE layer, one process on CPU: its output
equals a direct computation from its weights (router at d, experts at ℓ, projections around
dispatch and combine, shared expert at d); without a latent size it is megatron-core's MoELayer;
a tiny hybrid with LatentMoE trains."""

import pytest
import torch
import torch.nn.functional as F

from hymoe.model import hf
from hymoe.model.config import ModelConfig
from hymoe.precision.config import PrecisionConfig
from hymoe.precision.policy import decide

VOCAB = 64
CFG = ModelConfig(pattern="ME", hidden_size=48, num_experts=6, moe_router_topk=3,
                  moe_ffn_hidden_size=40, moe_shared_expert_intermediate_size=56,
                  moe_latent_size=20, moe_router_topk_scaling_factor=2.5,
                  mamba_num_heads=4, mamba_head_dim=12, mamba_num_groups=2, mamba_state_dim=8,
                  mamba_chunk_size=8)


def relu2(x):
    return F.relu(x) ** 2


def reference_latent_moe(layer, x):
    """x [s, b, d] → [s, b, d], computed from the layer's weights without megatron-core."""
    d = x.shape[-1]
    h = x.reshape(-1, d).float()
    scores = torch.sigmoid(h @ layer.router.weight.float().T)  # [T, E]
    k = layer.config.moe_router_topk
    idx = torch.topk(scores + layer.router.expert_bias, k, dim=-1).indices  # bias selects only
    w = scores.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * layer.config.moe_router_topk_scaling_factor
    latent = h @ layer.fc1_latent_proj.weight.T  # [T, ℓ]
    experts = layer.experts.local_experts
    every = torch.stack([relu2(latent @ e.linear_fc1.weight.T) @ e.linear_fc2.weight.T
                         for e in experts])  # [E, T, ℓ]
    routed = (every.permute(1, 0, 2).gather(1, idx[..., None].expand(-1, -1, latent.shape[1]))
              * w[..., None]).sum(1)
    shared = layer.shared_experts
    out = routed @ layer.fc2_latent_proj.weight.T + relu2(
        h @ shared.linear_fc1.weight.T) @ shared.linear_fc2.weight.T
    return out.reshape(x.shape)


@pytest.fixture(scope="module")
def model():
    m = hf.build_single_process(CFG, VOCAB, seed=11)
    with torch.no_grad():  # a routing bias large enough to change which experts are picked
        m.decoder.layers[1].mlp.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 6))
    return m


def test_latent_shapes_and_names(model):
    layer = model.decoder.layers[1].mlp
    assert layer.fc1_latent_proj.weight.shape == (20, 48)
    assert layer.fc2_latent_proj.weight.shape == (48, 20)
    assert layer.experts.local_experts[0].linear_fc1.weight.shape == (40, 20)  # experts at ℓ
    assert layer.experts.local_experts[0].linear_fc2.weight.shape == (20, 40)
    assert layer.shared_experts.linear_fc1.weight.shape == (56, 48)  # shared expert at d
    assert layer.router.weight.shape == (6, 48)  # router at d
    # Replicated over TP, fed different tokens under sequence parallel: TP-summed gradient.
    assert hasattr(layer.fc1_latent_proj.weight, "sequence_parallel")
    names = set(model.state_dict())
    assert {"decoder.layers.1.mlp.fc1_latent_proj.weight",
            "decoder.layers.1.mlp.fc2_latent_proj.weight"} <= names
    # Nemotron 3 keeps latent projections in BF16 under NVFP4: the policy matches these names.
    nvfp4 = PrecisionConfig(recipe="nvfp4")
    for name in ("decoder.layers.1.mlp.fc1_latent_proj", "decoder.layers.1.mlp.fc2_latent_proj"):
        assert decide(name, 1, 40, nvfp4)[0] == "bf16"


def test_forward_equals_reference():
    m = hf.build_single_process(CFG, VOCAB, seed=12)
    layer = m.decoder.layers[1].mlp.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # O(1) outputs, so that a 1% change in one weight is visible
        for p in layer.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        layer.router.expert_bias.copy_(0.2 * torch.randn(6, generator=gen))
    x = torch.randn(13, 3, 48, generator=gen)
    with torch.no_grad():
        out, bias = layer(x)
        ref = reference_latent_moe(layer, x)
    assert bias is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # The reference is sensitive to the pieces it checks: drop the latent projection's effect.
    with torch.no_grad():
        layer.fc2_latent_proj.weight.mul_(1.01)
        assert not torch.allclose(layer(x)[0], ref, rtol=1e-5, atol=1e-5)
        layer.fc2_latent_proj.weight.div_(1.01)


def test_without_latent_is_megatrons_moe_layer():
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from hymoe.model.build import build_transformer_config
    from hymoe.model.latent_moe import LatentMoELayer
    from hymoe.model.specs import hybrid_stack_submodules

    cfg = ModelConfig(pattern="E", hidden_size=32, num_experts=4, moe_router_topk=2,
                      moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=16)
    m = hf.build_single_process(cfg, VOCAB, seed=2)
    ours = m.decoder.layers[0].mlp.eval()
    assert type(ours) is LatentMoELayer and not hasattr(ours, "fc1_latent_proj")
    spec = hybrid_stack_submodules(4).moe_layer.submodules.mlp
    plain = MoELayer(build_transformer_config(cfg, params_dtype=torch.float32), spec.submodules)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(7, 2, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x)[0], plain.eval()(x)[0])


def test_tiny_latent_hybrid_trains(model):
    model.train()
    gen = torch.Generator().manual_seed(3)
    data = torch.randint(0, VOCAB, (4, 33), generator=gen)
    tokens, labels = data[:, :-1], data[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(tokens, None, None, labels=labels).mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    layer = model.decoder.layers[1].mlp
    expert_fc1 = [e.linear_fc1.weight.grad for e in layer.experts.local_experts]
    assert sum(int(g is not None and g.abs().sum() > 0) for g in expert_fc1) >= 3
    for p in (layer.fc1_latent_proj.weight, layer.fc2_latent_proj.weight, layer.router.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert losses[-1] < losses[0] - 0.5, losses
