"""megatron-core module specs for the hybrid stack, built only from modules that need no
Transformer Engine or apex (megatron-core's own ``mamba_stack_spec`` hard-wires TE).

One spec per layer symbol of the pattern language (``hymoe.model.pattern``):
``M`` → MambaLayer(norm, Mamba-2 mixer), ``*`` → TransformerLayer(norm, self-attention, no MLP),
``-`` → MLPLayer(norm, dense MLP), ``E`` → MoETransformerLayer(norm, MoE with shared expert; a
LatentMoE when ``config.moe_latent_size`` is set, see ``hymoe.model.latent_moe``).
Linear layers come from ``linear``, so the precision layer can substitute quantized ones.
"""

from __future__ import annotations

from dataclasses import replace

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.ssm.mamba_block import MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from hymoe.model.latent_moe import HybridMoETransformerLayer, LatentMoELayer
from hymoe.model.mamba_mixer import MambaMixer, MambaMixerSubmodules
from hymoe.model.norm import RMSNorm
from hymoe.parallel.context import SDPAttention


def hybrid_stack_submodules(num_experts: int | None) -> MambaStackSubmodules:
    """Layer specs for every symbol of the pattern (``num_experts`` None when there is no E).
    Core attention is hymoe's ``SDPAttention`` (PyTorch SDPA; context parallel when ``cp`` > 1):
    megatron-core's own local attention materialises all scores and refuses cp > 1."""
    backend = LocalSpecProvider()
    col, row = backend.column_parallel_linear(), backend.row_parallel_linear()
    mamba = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=RMSNorm,
            mixer=ModuleSpec(
                module=MambaMixer, submodules=MambaMixerSubmodules(in_proj=col, out_proj=row)
            ),
            mamba_bda=get_bias_dropout_add,
        ),
    )
    attention = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=col,
                    core_attention=SDPAttention,
                    linear_proj=row,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )
    mlp = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    moe = None
    if num_experts:
        moe = ModuleSpec(
            module=HybridMoETransformerLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=RMSNorm,
                # SequentialMLP experts: grouped GEMM needs TE or the grouped_gemm package.
                # LatentMoELayer is megatron-core's MoELayer when moe_latent_size is None.
                mlp=replace(
                    get_moe_module_spec_for_backend(backend, num_experts, moe_grouped_gemm=False),
                    module=LatentMoELayer,
                ),
                mlp_bda=get_bias_dropout_add,
            ),
        )
    return MambaStackSubmodules(
        mamba_layer=mamba, attention_layer=attention, mlp_layer=mlp, moe_layer=moe or mamba
    )
