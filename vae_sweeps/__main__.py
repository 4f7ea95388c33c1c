"""``python -m vae_sweeps [overrides]`` trains one VAE; ``-m`` sweeps (Hydra multirun)."""

import os
import shlex
import signal
import sys
import uuid

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vae_sweeps import devices
from vae_sweeps.errors import SweepFailed, UserError, refuse_password

devices.register_resolver()  # ${jobs_at_once:...} of hydra/launcher=joblib_gpu, before Hydra composes


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from vae_sweeps.config import validate  # after Hydra has parsed the command line: --help stays fast

    try:
        validate(cfg)  # before Lightning is imported: a bad value is refused in seconds, not ten
        from vae_sweeps.train import train

        result = train(cfg)
    except UserError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep records this job as failed and goes on
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if result.get("skipped"):
        print(f"Skipped: {result['skipped']}.")
    if "test/loss" in result:  # not for a run that is still training
        print(f"test/recon {result['test/recon']:.2f}  test/kl {result['test/kl']:.2f}  "
              f"test/loss {result['test/loss']:.2f}  (per image)")
    print(f"MLflow run id: {result['run_id']}")
    return result.get("test/loss", float("nan"))


def refuse_passwords(args: list[str]) -> None:
    """Refuse a URI with a password on the command line or in MLFLOW_TRACKING_URI before Hydra
    starts: Hydra saves the overrides under outputs/ (.hydra/) before any job begins."""
    for arg in args:
        key, _, value = arg.partition("=")
        refuse_password(key.lstrip("+~"), value.strip("'\""))  # tracking.uri='http://...'; Hydra unquotes it
    refuse_password("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI", ""))


if __name__ == "__main__":
    try:
        refuse_passwords(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # A new id for each launch, in its output folder's name (hydra.run.dir and hydra.sweep.dir in
    # conf/config.yaml): two launches in the same second never share a folder or a checkpoint.
    os.environ["VAE_SWEEPS_LAUNCH_ID"] = uuid.uuid4().hex[:6]
    # The command behind every run of this launch, its `command` tag (train.py), in any launcher's
    # job: the report names the commands behind its numbers. It holds no password (refused above).
    os.environ["VAE_SWEEPS_COMMAND"] = shlex.join(["python", "-m", "vae_sweeps", *sys.argv[1:]])
    try:
        main()
    except SweepFailed as err:  # jobs with bad values (2), or jobs that failed (1): the study sweeper's list
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.status)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (faults.Interrupted), in a run or a sweep
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        sys.exit(128 + signum)  # as a shell expects: 130, 143
