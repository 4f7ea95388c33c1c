"""The evaluation of a trained run, at its end or later: ``python -m vae_sweeps.backfill``.

Every run ends with this evaluation (train.py: evaluation.compute with every part of
evaluation.PARTS, then tracking.log_evaluation). A run trained before one of its metrics
existed gets it later, without
retraining: this command looks in each FINISHED run for every metric of the registry
(metrics.py) that applies to it, and for a run that lacks some it loads the run's checkpoint from
MLflow, computes the parts that compute them, and logs the metrics it lacked into the same run,
at the step of its last epoch (the metrics it has stay as they are). A second call finds
nothing to do.

    python -m vae_sweeps.backfill                            # every FINISHED run that lacks a metric
    python -m vae_sweeps.backfill model.name=mlp3 data.name=mnist --dry-run
    python -m vae_sweeps.backfill --tracking-uri http://127.0.0.1:5000 --data-root /path/to/datasets

The parts are evaluation.PARTS: ``evaluation`` (ELBO, IW log p(x), reconstructions, active
units, k-NN, sharpness, the prior's own) and ``judge`` (judge.py: judged accuracy per class,
classes drawn, the class entropy of prior samples).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import tempfile

import torch
import yaml
from mlflow import MlflowClient
from omegaconf import OmegaConf

from vae_sweeps import evaluation, identity, metrics, options, store, tracking
from vae_sweeps.errors import UserError, config_folder

class NoRunMatches(Exception):
    """The filters of ``python -m vae_sweeps.backfill`` match no FINISHED run: exit status 1."""


# ---------------------------------------------------------------------------- back-filling tracked runs


def finished_runs(client, experiment: str) -> list[tuple[object, dict[str, str]]]:
    """(run, its params completed with today's defaults) for every FINISHED run of ``experiment``."""
    return [(run, identity.completed(run.data.params))
            for run in store.every_run(client, experiment, "attributes.status = 'FINISHED'")]


def pending(client, experiment: str, filters: dict[str, str], runs=None) -> list[tuple[object, dict[str, list[str]]]]:
    """(run, part -> the metrics of it that the run lacks: metrics.lacking) for every FINISHED
    run of ``experiment`` that matches ``filters`` and lacks a metric (``runs``: finished_runs,
    if the caller has them)."""
    todo = []
    for run, settings in finished_runs(client, experiment) if runs is None else runs:
        if identity.matches(settings, filters) and (lacks := metrics.lacking(run.data.metrics, settings)):
            todo.append((run, lacks))
    return todo


def check_filters(runs: list[tuple[object, dict[str, str]]], filters: dict[str, str], experiment: str) -> None:
    """Raise UserError for a filter key that is not a param (of the project's config or of any
    run), and NoRunMatches when no FINISHED run matches ``filters``, naming each filter that none
    of them has and the values the runs have."""
    known = set(identity.params(identity.compose(["paths.output_dir=."]))) | {k for _, s in runs for k in s}
    unknown = [key for key in filters if key not in known]
    if unknown:
        close = [m for key in unknown for m in difflib.get_close_matches(key, sorted(known), n=1)]
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UserError(f"{', '.join(unknown)} is not a param of any run{hint}: filters are KEY=VALUE params, as the "
                        "MLflow runs show them, e.g. model.name=mlp3 seed=0.")
    if not filters or any(identity.matches(settings, filters) for _, settings in runs):
        return
    if not runs:
        raise NoRunMatches(f"Experiment {experiment!r} has no FINISHED run to filter (--experiment, --tracking-uri).")
    misses = []
    for key, value in filters.items():
        if not any(identity.matches(settings, {key: value}) for _, settings in runs):
            have = sorted({settings[key] for _, settings in runs if key in settings})
            misses.append(f"{key}={value} (the runs have {', '.join(have[:12]) + (', ...' if len(have) > 12 else '')})"
                          if have else f"{key}={value} (no run has {key})")
    why = f": none has {'; '.join(misses)}" if misses else " (each filter matches some run, but not all at once)"
    asked = " ".join(f"{key}={value}" for key, value in filters.items())
    raise NoRunMatches(f"No FINISHED run of experiment {experiment!r} matches {asked}{why}.")


def data_option(settings: dict, data_root: str) -> tuple:
    """The data option of a run (its ``data.*`` params, completed), as a hashable key, reading
    from ``data_root`` and downloading nothing. The run's own ``data.verify``: a run on files of
    the user's own skipped the digest check."""
    option = {**(options.option_config("data", settings["data.name"]) or {}),
              **{key[len("data."):]: value for key, value in settings.items() if key.startswith("data.")}}
    typed = {key: _typed(value) for key, value in option.items()}
    if "root" in typed:
        typed.update(root=data_root, download=False)
    return tuple(sorted(typed.items()))


def _typed(value):
    """A param's string as the YAML value it came from (``128`` -> 128, ``False`` -> False)."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def backfill(uri: str, experiment: str, filters: dict[str, str], data_root: str, dry_run: bool = False) -> int:
    """Evaluate every pending run (see ``pending``); returns how many were (or would be) filled.
    Raises UserError for a filter that is not a param, NoRunMatches when no run matches."""
    from vae_sweeps.module import VAEModule  # Lightning: only when there is work

    client = store.RetryingClient(MlflowClient(tracking_uri=uri))
    runs = finished_runs(client, experiment)
    check_filters(runs, filters, experiment)
    todo = pending(client, experiment, filters, runs)
    print(f"{len(todo)} FINISHED run(s) lack metrics of the evaluation" + ("." if not todo else ":"))
    for run, lacks in todo:
        print(f"  {run.info.run_name} ({run.info.run_id[:8]}): "
              + "; ".join(f"{part} ({', '.join(names)})" for part, names in lacks.items()))
    if dry_run or not todo:
        return len(todo)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    datamodules = {}
    for run, lacks in todo:
        settings = identity.completed(run.data.params)
        datamodule = datamodules.get(data_key := data_option(settings, data_root))
        if datamodule is None:
            datamodule = datamodules[data_key] = options.build("data", dict(data_key), seed=int(settings["seed"]))
            datamodule.load()
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = client.download_artifacts(run.info.run_id, "checkpoints/last.ckpt", tmp)
            module = VAEModule.load_from_checkpoint(checkpoint, map_location=device, weights_only=True)
        datamodule.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in datamodule.splits.items()}
        torch.manual_seed(int(settings["seed"]))  # the evaluation's Monte Carlo draws
        values, tags = evaluation.compute(list(lacks), module.vae.eval(), datamodule, settings, uri, experiment)
        new = {key: value for key, value in values.items() if key not in run.data.metrics}  # the others stay
        tags = {key: value for key, value in tags.items() if key not in run.data.tags}
        history = client.get_metric_history(run.info.run_id, "train/loss")
        step = max((m.step for m in history), default=int(settings["trainer.max_epochs"]))
        tracking.log_evaluation(client, run.info.run_id, new,
                       {**tags, "eval_version": evaluation.EVAL_VERSION, "eval_backfilled": evaluation.EVAL_VERSION}, step)
        print(f"  filled {run.info.run_name}: {len(new)} metric(s)"
              + "".join(f", {m.key} {new[m.key]:.3f}" for m in metrics.shown() if m.key in new))
    return len(todo)


def main(argv: list[str] | None = None) -> None:
    defaults = OmegaConf.load(identity.CONF_DIR / "config.yaml")
    parser = argparse.ArgumentParser(prog="python -m vae_sweeps.backfill", description=__doc__.split("\n\n")[0])
    parser.add_argument("filters", nargs="*", metavar="KEY=VALUE",
                        help="only runs whose params match, e.g. model.name=mlp3 seed=0")
    parser.add_argument("--tracking-uri", default=store.resolve_uri(defaults.tracking.uri),
                        help=f"MLflow store (default: $MLFLOW_TRACKING_URI, else {defaults.tracking.uri})")
    parser.add_argument("--experiment", default=defaults.tracking.experiment, help="MLflow experiment name")
    parser.add_argument("--data-root", default=os.environ.get("VAE_SWEEPS_DATA_DIR", "data"),
                        help="folder holding MNIST/raw/ and FashionMNIST/raw/ (default: $VAE_SWEEPS_DATA_DIR, else data)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs to fill, evaluate none")
    parser.add_argument("--config-dir", type=config_folder, metavar="DIR",
                        help="a folder of your own options (DIR/<axis>/<name>.yaml), as a job's --config-dir: "
                             "needed for runs of your own model, dataset, prior or loss")
    args = parser.parse_args(argv)
    bad = [f for f in args.filters if "=" not in f]
    if bad:
        parser.error(f"filters are KEY=VALUE params, e.g. model.name=mlp3; not {', '.join(bad)}")
    filters = dict(f.split("=", 1) for f in args.filters)
    store.quiet_downloads()
    try:
        with identity.project_config(args.config_dir):
            backfill(store.absolute_uri(args.tracking_uri), args.experiment, filters, args.data_root, args.dry_run)
    except NoRunMatches as err:  # nothing to do, but not what was asked: like grep, 1
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
