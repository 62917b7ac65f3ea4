"""LatentMoE (Nemotron 3): routed experts work in a latent dimension ℓ < d.

    out = fc2_latent_proj( Σ_k p_k · expert_k( fc1_latent_proj(x) ) ) + shared_expert(x)

The router (on x, at the full hidden size d), the shared expert and every non-expert layer stay
at d; the routed experts, the token dispatch and the combine run at ℓ, so all-to-all traffic and
expert weights shrink by d/ℓ (Nemotron 3 spends that on more experts and a larger top-k).
This is the math of Hugging Face ``nemotron_h``'s ``NemotronHMoE`` with ``moe_latent_size``.

Built on megatron-core's ``MoELayer`` without Transformer Engine: megatron-core 0.16.1 has the
same two projections but builds them as TE linears (its constructor asserts TE). Here they are
``LatentProjection``s, megatron's "duplicated" linear in plain PyTorch: the whole weight on every
tensor-parallel rank, applied to this rank's tokens. Under sequence parallelism each TP rank sees
different tokens, so the weight is marked ``sequence_parallel`` and megatron-core sums its
gradient over the TP group (as for the router and the norms). Routed experts are built by
megatron-core itself at ℓ (its ``MLP`` reads ``config.moe_latent_size`` for ``is_expert``), so
expert TP/EP sharding, dispatchers and checkpoints are megatron-core's.

Names (``mlp.fc1_latent_proj`` / ``mlp.fc2_latent_proj``) match megatron-core's and HF's, so the
precision policy's ``*fc1_latent_proj=bf16`` rule and the HF mapping apply unchanged. With
``moe_latent_size`` None the layer is exactly megatron-core's ``MoELayer``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import (
    get_default_pg_collection,
    maybe_skip_or_early_return_by_cudagraph,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import MoETransformerLayer


class LatentProjection(MegatronModule):
    """``y = x Wᵀ`` with W [out, in] whole on every TP rank; x [..., in] → (y [..., out], None).

    Returns ``(output, bias)`` like megatron's linears. No bias (Nemotron 3 has none)."""

    def __init__(self, config: TransformerConfig, input_size: int, output_size: int, init_method,
                 tp_group=None):
        super().__init__(config)
        self.tp_group = tp_group  # for the checkpoint's replica ids (replicated over TP)
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype)
        )
        if config.perform_initialization:
            # The default generator, as megatron's router: seeded alike on every TP rank.
            init_method(self.weight)
        # Replicated over TP but fed different tokens under sequence parallel: megatron-core
        # all-reduces the gradient of parameters carrying this flag over the TP group.
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor):
        return F.linear(x, self.weight), None

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, duplicated"


class _NoExperts(torch.nn.Module):
    """Placeholder so that MoELayer.__init__ does not build the experts at the wrong width."""

    def __init__(self, *args, **kwargs):
        super().__init__()


@contextmanager
def _latent_hidden_from(config: TransformerConfig):
    """megatron-core's MoELayer constructor asserts TE when ``moe_latent_size`` is set; hide
    the field while it runs (everything it builds is independent of it once the experts are
    built separately), then restore it."""
    latent = config.moe_latent_size
    config.moe_latent_size = None
    try:
        yield latent
    finally:
        config.moe_latent_size = latent


def _aux_loss_independent_of_layout(router) -> None:
    """Make the load-balancing loss's gradient the same at every tp/cp (and dp for the global
    variant), as the layout equality tests require.

    Each rank's aux loss is its tokens' share of the loss of the whole reduce group (tp·cp ranks
    for the sequence aux loss), normalised by the group's token count; with per-token loss
    scaling megatron-core 0.16.1 multiplies it by the rank's *local* token count, which finalize
    then divides by the global one. Summed over the group that is the aux loss times
    local/group tokens = 1/(tp·cp) under sequence or context parallelism: the coefficient would
    silently shrink with the layout. Counting the group's tokens instead restores the cp = tp = 1
    gradient exactly."""
    attach = router.attach_and_log_load_balancing_loss

    def attach_group_scaled(activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                            reduce_group_has_dp=False, valid_token_count=None):
        if router.calculate_per_token_loss:
            local = activation.shape[0] if valid_token_count is None else valid_token_count
            valid_token_count = local * reduce_group.size()
        return attach(activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                      reduce_group_has_dp, valid_token_count)

    router.attach_and_log_load_balancing_loss = attach_group_scaled


class LatentMoELayer(MoELayer):
    """megatron-core's MoELayer with d → ℓ before dispatch and ℓ → d after combine.

    Input/output ``[s, b, d]`` (s local under sequence parallel); the dispatcher, experts and
    combine see ``[tokens, ℓ]``. Shared-expert overlap with the dispatcher is not supported (as in
    megatron-core's own latent MoE): the shared expert runs on x at d.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        if not config.moe_latent_size:
            super().__init__(config, submodules, layer_number, pg_collection)
            _aux_loss_independent_of_layout(self.router)
            return
        if config.moe_shared_expert_overlap:
            raise ValueError(
                "model.moe_latent_size: shared-expert overlap is not supported with LatentMoE "
                "(set moe_shared_expert_overlap=False)"
            )
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        with _latent_hidden_from(config) as latent:
            super().__init__(
                config, replace(submodules, experts=_NoExperts), layer_number, pg_collection
            )
        self.submodules = submodules
        # megatron-core's MLP builds routed experts (is_expert=True) at config.moe_latent_size.
        self.experts = build_module(
            submodules.experts, self.num_local_experts, config, pg_collection=pg_collection
        )
        _aux_loss_independent_of_layout(self.router)
        self.fc1_latent_proj = LatentProjection(
            config, config.hidden_size, latent, config.init_method, tp_group=pg_collection.tp
        )
        self.fc2_latent_proj = LatentProjection(
            config, latent, config.hidden_size, config.output_layer_init_method,
            tp_group=pg_collection.tp,
        )

    @maybe_skip_or_early_return_by_cudagraph("preprocess")  # as megatron-core's preprocess
    def preprocess(self, hidden_states, probs, routing_map):
        """Project d → ℓ, then megatron's dispatch preprocessing (permutation bookkeeping)."""
        if self.config.moe_latent_size:
            hidden_states, _ = self.fc1_latent_proj(hidden_states)
        return self.token_dispatcher.dispatch_preprocess(hidden_states, routing_map, probs)

    def postprocess(self, output, shared_expert_output):
        """Un-permute (still at ℓ), project ℓ → d, add the shared expert."""
        output = self.token_dispatcher.combine_postprocess(output)
        if self.config.moe_latent_size:
            output, _ = self.fc2_latent_proj(output)
        if shared_expert_output is not None:
            output = output + shared_expert_output
        return output


class _DropUnknownMlpWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


class HybridMoETransformerLayer(MoETransformerLayer):
    """megatron-core's MoETransformerLayer for an ``E`` layer whose MLP is a ``LatentMoELayer``.

    megatron-core's TransformerLayer hands ``pg_collection`` only to an MLP whose class is exactly
    ``MoELayer`` (and warns "Unknown MLP type" for a subclass); this passes it through the spec's
    params instead and drops that one warning while the layer is built. Nothing else differs.
    """

    def __init__(self, config, submodules, *args, pg_collection=None, **kwargs):
        mlp = submodules.mlp
        if isinstance(mlp, ModuleSpec) and mlp.module is LatentMoELayer:
            params = dict(mlp.params or {}, pg_collection=pg_collection)
            submodules = replace(submodules, mlp=replace(mlp, params=params))
        layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
        quiet = _DropUnknownMlpWarning()
        layer_logger.addFilter(quiet)
        try:
            super().__init__(config, submodules, *args, pg_collection=pg_collection, **kwargs)
        finally:
            layer_logger.removeFilter(quiet)
