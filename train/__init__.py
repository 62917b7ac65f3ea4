"""Training: Hydra config schema, the trainer loop, optimizer, schedules, checkpoints, logging."""
