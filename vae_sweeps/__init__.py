"""vae_sweeps: tracked Hydra sweeps of a VAE study (Lightning for training, MLflow for tracking).

``python -m vae_sweeps`` trains one job, ``-m`` sweeps; ``python -m vae_sweeps.report``
rebuilds the study's tables and figures from the tracked runs. See README.md.
"""
