"""Hydra config tree: groups (model, parallel, precision, data, train, logging, checkpoint) and
named recipes. A Python package only so that the YAML files install with hymoe."""
