"""Model definitions: layer-pattern language and megatron-core module specs for the hybrid
Mamba-2 / attention / MoE stack. Knows nothing of process groups beyond what megatron-core layers take."""
