"""hymoe: pretraining of Nemotron-3-style hybrid Mamba-Transformer MoE models in NVFP4 on megatron-core."""

__version__ = "0.1.0"
