"""The evaluation of a trained run, at its end or later: ``python -m vae_sweeps.backfill``.

Every run ends with this evaluation (train.py). A run trained before a part of it existed
gets that part later, without retraining: this command loads each FINISHED run's checkpoint
from MLflow, computes the parts the run lacks, and logs them into the same run, at the step of
its last epoch, with the tag ``eval_version`` (and ``eval_backfilled``, the version that filled
it). A second call finds nothing to do.

    python -m vae_sweeps.backfill                            # every FINISHED run that lacks a part
    python -m vae_sweeps.backfill model.name=mlp3 data.name=mnist --dry-run
    python -m vae_sweeps.backfill --tracking-uri http://127.0.0.1:5000 --data-root ../shared/datasets

The parts (``PARTS``: a part, and one metric that every run with that part has):
``evaluation`` (evaluation.py: ELBO, IW log p(x), reconstructions, active units, k-NN,
sharpness) and ``judge`` (judge.py: judged accuracy per class, classes drawn, the class
entropy of prior samples).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient
from omegaconf import OmegaConf

from vae_sweeps import evaluation, identity, judge, options, tracking
from vae_sweeps.errors import UserError

log = logging.getLogger(__name__)

EVAL_VERSION = "2"  # 1: the evaluation part; 2: and the judge part
PARTS = {"evaluation": "test/knn_accuracy", "judge": "test/judged_accuracy"}
CONF = Path(__file__).resolve().parents[1] / "conf" / "config.yaml"


class NoRunMatches(Exception):
    """The filters of ``python -m vae_sweeps.backfill`` match no FINISHED run: exit status 1."""


def missing_parts(metrics: dict) -> list[str]:
    return [part for part, metric in PARTS.items() if metric not in metrics]


def judges_experiment(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """The store's experiment that holds the judges of ``experiment``'s runs."""
    return tracking.open_store(uri, f"{experiment}-judges")


def compute(parts: list[str], vae, datamodule, settings: dict, uri: str, experiment: str
            ) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of the evaluation ``parts`` for a trained VAE; ``settings`` are the run's
    params (``eval.*``, ``seed``), completed with today's defaults."""
    metrics, tags = {}, {}
    if "evaluation" in parts:
        metrics.update(evaluation.evaluate(vae, datamodule.splits, int(settings["eval.iw_samples"]),
                                           int(settings["eval.knn_k"])))
    if "judge" in parts:
        client, judges = judges_experiment(uri, experiment)
        epochs = int(settings["eval.judge_epochs"])
        dataset = judge.data_key(settings["data.name"], datamodule)
        with tracking.claim(uri, f"judge-{dataset}-{epochs}"):  # parallel jobs train it once
            the_judge = judge.load_or_train(client, judges, dataset, datamodule.splits, epochs)
        the_judge = the_judge.to(next(vae.parameters()).device)
        judged, drawn = judge.judge_metrics(the_judge, vae, datamodule.splits["test"], int(settings["seed"]))
        metrics.update(judged)
        tags["classes_drawn"] = drawn
    return metrics, {**tags, "eval_version": EVAL_VERSION}


def log_evaluation(client, run_id: str, metrics: dict, tags: dict, step: int) -> None:
    tracking.log_metrics(client, run_id, {k: v for k, v in metrics.items() if not math.isnan(v)}, step)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


# ---------------------------------------------------------------------------- back-filling tracked runs


def _matches(settings: dict[str, str], filters: dict[str, str]) -> bool:
    def same(a: str | None, b: str) -> bool:
        if a is None:
            return False
        try:
            return float(a) == float(b)
        except ValueError:
            return a == b

    return all(same(settings.get(key), value) for key, value in filters.items())


def finished_runs(client, experiment: str) -> list[tuple[object, dict[str, str]]]:
    """(run, its params completed with today's defaults) for every FINISHED run of ``experiment``."""
    return [(run, identity.completed(run.data.params))
            for run in tracking.every_run(client, experiment, "attributes.status = 'FINISHED'")]


def pending(client, experiment: str, filters: dict[str, str], runs=None) -> list[tuple[object, list[str]]]:
    """(run, the parts it lacks) for every FINISHED run of ``experiment`` that matches
    ``filters`` and lacks a part (``runs``: finished_runs, if the caller has them)."""
    todo = []
    for run, settings in finished_runs(client, experiment) if runs is None else runs:
        parts = missing_parts(run.data.metrics)
        if parts and _matches(settings, filters):
            todo.append((run, parts))
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
    if not filters or any(_matches(settings, filters) for _, settings in runs):
        return
    if not runs:
        raise NoRunMatches(f"Experiment {experiment!r} has no FINISHED run to filter (--experiment, --tracking-uri).")
    misses = []
    for key, value in filters.items():
        if not any(_matches(settings, {key: value}) for _, settings in runs):
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

    client = tracking.RetryingClient(MlflowClient(tracking_uri=uri))
    runs = finished_runs(client, experiment)
    check_filters(runs, filters, experiment)
    todo = pending(client, experiment, filters, runs)
    print(f"{len(todo)} FINISHED run(s) lack part of the evaluation (version {EVAL_VERSION})"
          + ("." if not todo else ":"))
    for run, parts in todo:
        print(f"  {run.info.run_name} ({run.info.run_id[:8]}): {', '.join(parts)}")
    if dry_run or not todo:
        return len(todo)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    datamodules = {}
    for run, parts in todo:
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
        metrics, tags = compute(parts, module.vae.eval(), datamodule, settings, uri, experiment)
        history = client.get_metric_history(run.info.run_id, "train/loss")
        step = max((m.step for m in history), default=int(settings["trainer.max_epochs"]))
        log_evaluation(client, run.info.run_id, metrics, {**tags, "eval_backfilled": EVAL_VERSION}, step)
        print(f"  filled {run.info.run_name}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items())
                                                          if k in PARTS.values()))
    return len(todo)


def main(argv: list[str] | None = None) -> None:
    defaults = OmegaConf.load(CONF)
    parser = argparse.ArgumentParser(prog="python -m vae_sweeps.backfill", description=__doc__.split("\n\n")[0])
    parser.add_argument("filters", nargs="*", metavar="KEY=VALUE",
                        help="only runs whose params match, e.g. model.name=mlp3 seed=0")
    parser.add_argument("--tracking-uri", default=defaults.tracking.uri,
                        help=f"MLflow store (default: $MLFLOW_TRACKING_URI, else {defaults.tracking.uri})")
    parser.add_argument("--experiment", default=defaults.tracking.experiment, help="MLflow experiment name")
    parser.add_argument("--data-root", default=os.environ.get("VAE_SWEEPS_DATA_DIR", "data"),
                        help="folder holding MNIST/raw/ and FashionMNIST/raw/ (default: $VAE_SWEEPS_DATA_DIR, else data)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs to fill, evaluate none")
    args = parser.parse_args(argv)
    bad = [f for f in args.filters if "=" not in f]
    if bad:
        parser.error(f"filters are KEY=VALUE params, e.g. model.name=mlp3; not {', '.join(bad)}")
    filters = dict(f.split("=", 1) for f in args.filters)
    tracking.quiet_downloads()
    try:
        backfill(tracking.resolve_uri(args.tracking_uri), args.experiment, filters, args.data_root, args.dry_run)
    except NoRunMatches as err:  # nothing to do, but not what was asked: like grep, 1
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
