"""``python -m vae_sweeps [overrides]`` trains one VAE; ``-m`` sweeps (Hydra multirun)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vae_sweeps import devices
from vae_sweeps.errors import UserError

devices.register_resolver()  # ${jobs_at_once:...} of hydra/launcher=joblib_gpu, before Hydra composes


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from vae_sweeps.train import train  # after Hydra has parsed the command line: --help stays fast

    try:
        result = train(cfg)
    except UserError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep records this job as failed and goes on
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if result.get("skipped"):
        print("Skipped: this configuration already has a FINISHED run (force=true trains it again).")
    print(f"test/recon {result['test/recon']:.2f}  test/kl {result['test/kl']:.2f}  "
          f"test/loss {result['test/loss']:.2f}  (per image)")
    print(f"MLflow run id: {result['run_id']}")
    return result["test/loss"]


if __name__ == "__main__":
    main()
