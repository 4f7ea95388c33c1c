"""A user's own package for vae_sweeps: a model, a dataset and a prior, each selected by one
config file in ../conf/ (examples/README.md)."""
