"""vae_sweeps' Hydra plugins: the study sweeper (study_sweeper.py) and the SLURM launcher that
follows its jobs with squeue (slurm_launcher.py). Hydra loads plugins only from the
hydra_plugins package."""
