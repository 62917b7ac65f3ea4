"""Model definitions: layer-pattern language and megatron-core module specs for the hybrid
Mamba-2 / attention / MoE stack. Knows nothing of process groups beyond what megatron-core layers take."""


def __getattr__(name: str):
    # hymoe.model.from_hf / to_hf without importing megatron or transformers on `import hymoe.model`.
    if name in ("from_hf", "to_hf"):
        from hymoe.model import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'hymoe.model' has no attribute {name!r}")
