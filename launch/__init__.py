"""Launching: torchrun and Slurm launchers and the cluster environment."""
