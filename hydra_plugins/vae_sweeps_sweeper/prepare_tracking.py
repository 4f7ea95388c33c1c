"""The Hydra callback of every launch (conf/config.yaml, hydra.callbacks): checks the tracking
settings before Hydra writes anything, and prepares the store once for a sweep's jobs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vae_sweeps import store, tracking
from vae_sweeps.config import validate_tracking
from vae_sweeps.errors import SweepFailed, UserError

log = logging.getLogger(__name__)


def sweep_id(config: DictConfig) -> str:
    """A sweep's id: the name of its folder (hydra.sweep.dir, outputs/multirun/<time>-<launch id>),
    so that the ``sweep_id`` tag of its runs leads to their logs. Resolving the folder here fixes
    its time for the whole sweep (Hydra keeps the resolved ``now`` with the config)."""
    return Path(str(config.hydra.sweep.dir)).name


class PrepareTracking(Callback):
    """Hydra callback: before one run or the jobs of a multirun start, and before Hydra writes
    anything under outputs/, check the composed tracking settings (a password in a config file
    or a quoted override is refused before it is saved). For a multirun, also create the store
    and the experiment once (SQLite's schema migration is not safe to run from jobs in
    parallel) and give the sweep an id that every job tags its run with: its folder's name."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            validate_tracking(config)
        except UserError as err:  # the CLI prints it and exits 2
            raise SweepFailed(str(err), status=2) from err

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:  # bad tracking settings, or a store that cannot be used: one paragraph, as for one run
            validate_tracking(config)
            uri = store.resolve_uri(config.tracking.uri)
            store.check_reachable(uri)  # a dry run too: the sweeper asks the store for its finished runs
            if config.hydra.sweeper.get("dry_run"):
                return
            store.open_store(uri, config.tracking.experiment)
        except UserError as err:  # the CLI prints it and exits 2
            raise SweepFailed(str(err), status=2) from err
        os.environ[tracking.SWEEP_ID_ENV] = sweep_id(config)
        log.info("Sweep id %s (its folder: %s)", os.environ[tracking.SWEEP_ID_ENV], config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        os.environ.pop(tracking.SWEEP_ID_ENV, None)
