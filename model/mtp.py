"""Multi-Token Prediction for the hybrid model, on megatron-core's MTP block.

megatron-core 0.16.1's ``MambaModel`` has no MTP; its ``GPTModel`` does. ``HybridModel`` adds
megatron-core's own ``MultiTokenPredictionBlock`` to the hybrid model: depth k combines the depth
k−1 hidden state of token i with the embedding of token i+k (``eh_proj``), runs one transformer layer
(attention + MoE for Nemotron 3 Super), and predicts token i+k+1 with the shared output head. The
depth losses are averaged and scaled by ``mtp_loss_scale`` into the main loss (megatron's
``MTPLossAutoScaler``), and reported separately (``mtp_report``).

With ``mtp_shared_layer`` every depth runs the same layer (same parameters), as in Super (2 depths
sharing one layer).

MTP runs on the last pipeline stage and embeds tokens there. With pp > 1 that stage holds a copy of
the first stage's input embedding, as megatron-core's GPTModel does: the copy starts equal to the
first stage's (an all-reduce over megatron's embedding group at build time), its gradient is summed
with the first stage's by megatron's ``finalize_model_grads`` (``shared_embedding_or_output_weight``
names it), so both copies take the same optimizer steps; it is left out of the gradient norm
(``shared``) and saved as a replica of the first stage's checkpoint entry. With tied output weights
the copy is also the output weight of that stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.mamba.mamba_model import MambaModel
from megatron.core.transformer.multi_token_prediction import (
    MTPLossAutoScaler,
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
    roll_tensor,
    tie_word_embeddings_state_dict,
)
from megatron.core.ssm.mamba_block import MambaStackSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from hymoe.model.chunked_loss import chunked_language_model_loss
from hymoe.model.norm import RMSNorm
from hymoe.parallel import context
from hymoe.parallel.setup import device
from hymoe.model.pattern import MOE


def mtp_transformer_layer_spec(stack: MambaStackSubmodules, depth: str) -> ModuleSpec:
    """One MTP depth's transformer layer ("*E": attention + MoE, "*-": attention + MLP), made of
    the same attention and MLP/MoE specs as the main stack's layers."""
    attention = stack.attention_layer.submodules
    ffn = stack.moe_layer if depth[1] == MOE else stack.mlp_layer
    return ModuleSpec(
        module=ffn.module if depth[1] == MOE else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=attention.input_layernorm,
            self_attention=attention.self_attention,
            self_attn_bda=attention.self_attn_bda,
            pre_mlp_layernorm=ffn.submodules.pre_mlp_layernorm,
            mlp=ffn.submodules.mlp,
            mlp_bda=ffn.submodules.mlp_bda,
        ),
    )


def mtp_block_spec(transformer_layer_spec: ModuleSpec, layers: int) -> ModuleSpec:
    layer = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=RMSNorm, hnorm=RMSNorm,
            eh_proj=tensor_parallel.ColumnParallelLinear,
            transformer_layer=transformer_layer_spec, layer_norm=RMSNorm,
        ),
    )
    return ModuleSpec(
        module=MultiTokenPredictionBlock,
        submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[layer] * layers),
    )


class SharedLayerMTPBlock(MultiTokenPredictionBlock):
    """An MTP block whose one layer runs at every depth (the same parameters each time).

    Built with a single layer rather than the same module listed twice: a module listed twice
    would be saved under two checkpoint keys with conflicting tensor-parallel sharding."""

    def __init__(self, config, spec, depths: int, vp_stage=None, pg_collection=None):
        super().__init__(config=config, spec=spec, vp_stage=vp_stage, pg_collection=pg_collection)
        assert len(self.layers) == 1
        self.depths = depths

    def forward(self, input_ids, position_ids, hidden_states, attention_mask, embedding=None, **_):
        outputs = [hidden_states]
        for _ in range(self.depths):
            hidden_states, input_ids, position_ids = self.layers[0](
                input_ids=input_ids, position_ids=position_ids, hidden_states=hidden_states,
                attention_mask=attention_mask, embedding=embedding,
            )
            outputs.append(hidden_states)
        return torch.cat(outputs, dim=0)


def _same_document(seq_idx: torch.Tensor, depth: int) -> torch.Tensor:
    """float [b, S/cp] (this CP rank's positions): 1 where MTP depth ``depth`` may predict from
    position i, i.e. tokens i … i+depth lie in one packed document. Its target, token i+depth+1,
    may then open the next document only after an EOD, as the main loss's does; a target further
    into another document would be predicted from that document's tokens (the rolled inputs)."""
    same = torch.zeros(seq_idx.shape, dtype=torch.float32, device=seq_idx.device)
    same[:, :-depth] = (seq_idx[:, depth:] == seq_idx[:, :-depth]).float()
    return context.shard_sequence(same)


class HybridModel(MambaModel):
    """megatron-core's MambaModel plus an optional MTP block (training forward only) and
    document-aware packing (``seq_idx``)."""

    def _mamba_mixers(self):
        if not hasattr(self, "_mixers"):
            from hymoe.model.mamba_mixer import MambaMixer

            self._mixers = [m for m in self.decoder.modules() if isinstance(m, MambaMixer)]
        return self._mixers

    # MambaModel.__init__ ends by tying the embedding across pipeline stages; HybridModel's own
    # __init__ does that instead, once the MTP stage's embedding copy exists.
    _stage_built = False

    def __init__(self, *args, mtp_layer_spec: ModuleSpec | None = None, mtp_depths: int = 0,
                 mtp_shared_layer: bool = False, vp_stage: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # This model chunk's virtual pipeline stage. megatron-core 0.16.1's MambaModel takes none
        # (its GPTModel does), yet megatron reads it to tell whether a chunk holds the embedding
        # group's copy (``_is_in_embd_group``), and the MTP layers number themselves from it.
        self.vp_stage = vp_stage
        self.mtp_process = mtp_layer_spec is not None and self.post_process
        self.mtp_depths = mtp_depths
        # Per depth: [loss sum, tokens] accumulated over microbatches; the train step reads and
        # resets it (logging only; gradients flow through MTPLossAutoScaler).
        self.mtp_report = None
        if self.mtp_process:
            if mtp_shared_layer:
                self.mtp = SharedLayerMTPBlock(
                    self.config, mtp_block_spec(mtp_layer_spec, 1), mtp_depths,
                    vp_stage=vp_stage, pg_collection=self.pg_collection,
                )
            else:
                self.mtp = MultiTokenPredictionBlock(
                    config=self.config, spec=mtp_block_spec(mtp_layer_spec, mtp_depths),
                    vp_stage=vp_stage, pg_collection=self.pg_collection,
                )
            self.mtp_report = torch.zeros(mtp_depths, 2, dtype=torch.float64)
            if not self.pre_process:
                # MTP embeds tokens i+k here, on the last stage: a copy of the first stage's
                # embedding (its values come from there in setup_embeddings_and_output_layer).
                self.embedding = LanguageModelEmbedding(
                    config=self.config, vocab_size=self.vocab_size,
                    max_sequence_length=self.max_sequence_length,
                    position_embedding_type=self.position_embedding_type,
                    scatter_to_sequence_parallel=kwargs.get(
                        "scatter_embedding_sequence_parallel", True),
                    tp_group=self.pg_collection.tp,
                )
                if self.share_embeddings_and_output_weights:
                    # The copy is the tied output weight too (megatron's convention for an MTP
                    # stage); the output layer's own weight would be a second, unused copy.
                    self.output_layer.weight = None
        self._stage_built = True
        if self.pre_process or self.post_process:
            self.setup_embeddings_and_output_layer()

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The weight tied or duplicated across pipeline stages: the input embedding on a stage
        that has one (the first, and with MTP the last), else the output layer's."""
        if self.pre_process or self.mtp_process:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.output_layer.weight
        return None

    def setup_embeddings_and_output_layer(self) -> None:
        """megatron-core's LanguageModule setup, which also sees the MTP stage's embedding copy:
        when a weight lives on two pipeline stages (tied output weight, or MTP's embedding), the
        later copy is zeroed and all-reduced over the embedding group, so both start as the first
        stage's. The all-reduce runs on the run's device (megatron's moves the weight with
        ``.cuda()``, which a CPU run lacks)."""
        if not self._stage_built:
            return
        if self.pre_process or self.mtp_process:
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if self.post_process and self.output_layer.weight is not None:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        if not (self.share_embeddings_and_output_weights or self.config.mtp_num_layers):
            return
        weight = self.shared_embedding_or_output_weight()
        if self.config.pipeline_model_parallel_size == 1:
            # Two layers add into one gradient: it must start from zero, not garbage.
            weight.zero_out_wgrad = True
            return
        if self.pre_process:
            weight.shared_embedding = True  # own gradient bucket under the distributed optimizer
        else:
            weight.data.fill_(0)
            weight.shared = True  # the gradient norm counts the first stage's copy only
            weight.shared_embedding = True
        # One call per rank of the embedding group: its first stage's first chunk and its last
        # stage's last chunk (the only chunks with pre_process / post_process).
        group = self.embd_group
        if (dist.is_initialized() and group is not None
                and dist.get_rank() in dist.get_process_group_ranks(group)):
            weight.data = weight.data.to(device())
            dist.all_reduce(weight.data, group=group)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        """megatron-core's, plus the MTP stage's embedding copy saved under the first stage's key as
        a replica (not written; loads the same tensor), as megatron's GPTModel does: a pp=1
        checkpoint loads at any pp and back."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.mtp_process and not self.pre_process:
            tie_word_embeddings_state_dict(
                state, self.embedding.word_embeddings.weight,
                f"{prefix}embedding.word_embeddings.weight",
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
            )
        return state

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                inference_context=None, runtime_gather_output=None, *, loss_mask=None,
                seq_idx=None, **kwargs):
        """``seq_idx`` int [b, S] (document index per token, from the loader) makes packed
        documents independent: Mamba state resets at each boundary and attention is masked to the
        token's own document (megatron's reset_attention_mask). None: one causal stream per row.

        Under context parallelism ``input_ids`` etc. hold this rank's S/cp tokens
        (``hymoe.parallel.context.shard_sequence``) while ``seq_idx`` covers the whole sequence:
        the Mamba scan runs over all of it and attention masks by global position."""
        for mixer in self._mamba_mixers():
            mixer.seq_idx = seq_idx
        cp = self.config.context_parallel_size
        if cp > 1 or seq_idx is not None:
            attention_mask = context.attention_mask(input_ids.shape[1] * cp, seq_idx, input_ids.device)
        chunked = getattr(self.config, "hymoe_loss_chunk_tokens", 0)
        if labels is None or not self.post_process or not (self.mtp_process or chunked):
            return super().forward(
                input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                labels=labels, inference_context=inference_context,
                runtime_gather_output=runtime_gather_output, **kwargs,
            )
        if position_ids is None:  # MTP rolls them with the tokens; no positional embedding uses them
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=attention_mask)
        if not self.mtp_process:
            return self.language_model_loss(hidden, labels)
        depths = self.mtp_depths
        hidden = self.mtp(input_ids=input_ids, position_ids=position_ids, hidden_states=hidden,
                          attention_mask=attention_mask, embedding=self.embedding)
        chunks = torch.chunk(hidden, 1 + depths, dim=0)
        hidden = chunks[0]
        mtp_labels = labels.clone()
        mask = torch.ones_like(mtp_labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
        scale = self.config.mtp_loss_scaling_factor / depths
        for k in range(depths):
            mtp_labels, _ = roll_tensor(mtp_labels, shifts=-1, dims=-1, cp_group=self.cp_group)
            mask, num_tokens = roll_tensor(mask, shifts=-1, dims=-1, cp_group=self.cp_group)
            keep = mask
            if seq_idx is not None:
                keep = mask * _same_document(seq_idx, k + 1).to(mask.device)
                num_tokens = keep.sum()
            loss = self.language_model_loss(chunks[k + 1], mtp_labels) * keep
            self.mtp_report[k, 0] += float(loss.detach().sum())
            self.mtp_report[k, 1] += float(num_tokens)
            # Per-token loss accounting (calculate_per_token_loss): the sum, not the mean.
            hidden = MTPLossAutoScaler.apply(hidden, scale * loss)
        return self.language_model_loss(hidden, labels)

    def language_model_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss fp32 [b, s] of the output layer on ``hidden`` [s, b, h]; in chunks of
        ``model.loss_chunk_tokens`` tokens when that is set (``hymoe.model.chunked_loss``)."""
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        chunk_tokens = getattr(self.config, "hymoe_loss_chunk_tokens", 0)
        if chunk_tokens:
            return chunked_language_model_loss(self, hidden, labels, chunk_tokens, weight)
        logits, _ = self.output_layer(hidden, weight=weight)
        return self.compute_language_model_loss(labels, logits)
