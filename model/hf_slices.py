"""Hugging Face ``nemotron_h`` weights read straight into a model of any layout: each rank reads
only the parts of the safetensors files that its shards hold.

megatron-core describes every weight of a rank as a ``ShardedTensor``: the checkpoint key of the
whole (global) tensor, its shape, and where this rank's piece sits in it (after its factories are
applied, the Mamba ``in_proj`` and ``conv1d`` are split into their z/x/B/C/dt components, and the
experts of a MoE layer are one tensor with a leading expert axis). ``HFSlices.read`` answers such a
description from the HF files with safetensors' lazy slicing, so memory holds this rank's piece and
no more — except attention's ``linear_qkv``, which megatron interleaves by key-value group: its
q, k and v are read whole (attention weights are a small part of a Nemotron 3 model) and joined.
The names follow ``hymoe.model.hf`` (one mapping for export, import and this).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from hymoe.model.config import ModelConfig
from hymoe.model.hf import _layer_names, _layers, _mtp_block_names, _qkv_join, safetensors_files
from hymoe.model.hf_config import HFConversionError
from hymoe.model.pattern import ATTENTION

_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.experts\.(linear_fc[12])\.weight$")


class HFSlices:
    def __init__(self, hf_dir: str | Path, cfg: ModelConfig):
        from safetensors import safe_open

        self.dir, self.cfg = Path(hf_dir), cfg
        self._files = {f: safe_open(str(self.dir / f), framework="pt")
                       for f in safetensors_files(self.dir)}
        self._where = {}
        for f, handle in self._files.items():
            for key in handle.keys():
                # transformers' in-memory names (model.*) read as the released ones (backbone.*)
                self._where[re.sub(r"^model\.", "backbone.", key)] = (f, key)
        self._names = self._megatron_to_hf()
        self._qkv = {}

    def _megatron_to_hf(self) -> dict[str, str]:
        cfg = self.cfg
        names = {"embedding.word_embeddings.weight": "backbone.embeddings.weight",
                 "decoder.final_norm.weight": "backbone.norm_f.weight"}
        if cfg.untie_embeddings_and_output_weights:
            names["output_layer.weight"] = "lm_head.weight"
        for ours, theirs, symbol in _layers(cfg):
            names.update({ours + a: theirs + b for a, b in _layer_names(symbol, cfg)})
            if symbol == ATTENTION:
                names[ours + "self_attention.linear_qkv.weight"] = theirs + "mixer.{}_proj.weight"
        names.update(dict(_mtp_block_names(cfg)))
        return names

    def _tensor(self, hf_name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        if hf_name not in self._where:
            raise HFConversionError(f"{self.dir}: no {hf_name!r} in the safetensors files")
        f, key = self._where[hf_name]
        part = self._files[f].get_slice(key)
        return part[index] if index is not None else part[:]

    def read(self, key: str, offset, shape, prepend: int = 0) -> torch.Tensor:
        """This rank's piece of checkpoint tensor ``key``: ``shape`` at ``offset`` (with
        ``prepend`` leading offsets that pick a whole tensor, e.g. the expert, and no shape)."""
        index = tuple(slice(o, o + n) for o, n in zip(offset[prepend:], shape))
        m = _EXPERTS.match(key)
        if m and prepend == 1:
            prefix, fc = m.groups()
            return self._tensor(self._hf(f"{prefix}.local_experts.{offset[0]}.{fc}.weight"), index)
        if prepend:
            raise HFConversionError(f"{key}: a sharded tensor with {prepend} leading axes has no HF layout")
        base, _, part = key.rpartition(".")
        components = self._components(base)
        if components and part in components:
            start = sum(components[c] for c in list(components)[:list(components).index(part)])
            index = (slice(start + index[0].start, start + index[0].stop),) + index[1:]
            return self._tensor(self._hf(base), index)
        if key.endswith("self_attention.linear_qkv.weight"):
            if key not in self._qkv:
                pattern = self._hf(key)
                self._qkv[key] = _qkv_join(*(self._tensor(pattern.format(n)) for n in "qkv"), self.cfg)
            return self._qkv[key][index]
        if key.endswith("mlp.router.expert_bias") and self._hf(key) not in self._where:
            return torch.zeros(shape)  # released checkpoints without a routing bias
        return self._tensor(self._hf(key), index)

    def _hf(self, key: str) -> str:
        if key not in self._names:
            raise HFConversionError(f"{key}: a weight of this model with no HF counterpart")
        return self._names[key]

    def _components(self, base: str) -> dict[str, int] | None:
        """Sizes of the parts megatron-core shards separately, in their order in the HF tensor."""
        cfg = self.cfg
        inner, bc = cfg.mamba_num_heads * cfg.mamba_head_dim, cfg.mamba_num_groups * cfg.mamba_state_dim
        if base.endswith("mixer.in_proj.weight"):
            return {"z": inner, "x": inner, "B": bc, "C": bc, "dt": cfg.mamba_num_heads}
        if base.endswith(("mixer.conv1d.weight", "mixer.conv1d.bias")):
            return {"x": inner, "B": bc, "C": bc}
        return None


def load_hf_weights(sharded_state_dict: dict, hf_dir: str | Path, cfg: ModelConfig) -> dict:
    """The state dict (nested as ``sharded_state_dict``, a model's or several chunks') with every
    tensor read from the HF folder: megatron's factories applied, each piece read, the factories
    merged back, as megatron-core's own load does. ``_extra_state`` entries are left out."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    sharded, _ = extract_matching_values(sharded_state_dict, lambda v: not isinstance(v, ShardedObject))
    sharded, _, factories = load_preprocess(sharded)
    reader = HFSlices(hf_dir, cfg)

    def fill(sh):
        if not isinstance(sh, ShardedTensor):
            return sh
        if sh.flattened_range is not None:
            raise HFConversionError(f"{sh.key}: flattened shards are not read from HF folders")
        piece = reader.read(sh.key, sh.global_offset, sh.local_shape, sh.prepend_axis_num)
        if tuple(piece.shape) != tuple(sh.local_shape):
            raise HFConversionError(f"{sh.key}: the HF folder gives {tuple(piece.shape)} where this "
                                    f"rank holds {tuple(sh.local_shape)}; is it the same architecture?")
        return piece.to(sh.data.dtype).reshape(sh.data.shape)

    with torch.no_grad():
        dict_list_map_inplace(fill, sharded)
    return apply_factory_merges(sharded, factories)
