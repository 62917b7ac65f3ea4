"""Data: tokenize text to webdataset shards with a manifest, then stream packed sequences.
Imports nothing else from hymoe; the trainer hands it its DP rank and world size."""
