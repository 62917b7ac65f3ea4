"""Parallel layout: config and validation, megatron parallel_state setup, and the CPU execution
layer that lets megatron-core run over gloo where no GPU is present."""
