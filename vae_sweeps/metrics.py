"""The registry of the end-of-run metrics: one entry per metric, read by everyone who needs them.

The evaluation at a run's end (``evaluation.compute``) runs the *parts* that compute these
metrics; the tables (tables.py) show the ones with a header, with their digits; and the back-fill
(``python -m vae_sweeps.backfill``) looks for each metric that applies to a run and computes the
parts of those it lacks. So a new metric is one entry here (and, for a new part, its function
in ``evaluation.PARTS``): old runs get it from the next back-fill, and the tables a column.

An entry (``Metric``) holds:

- ``name``: the MLflow metric ``test/<name>``; ``<k>`` in it stands for a class index
  (``judged_accuracy_<k>``: one metric per class, a run has it if it has one of them);
- ``part``: the part of the evaluation that computes it (a key of ``evaluation.PARTS``);
- ``header`` and ``digits``: its column in the tables' evaluation table (no header: none);
- ``where``: the runs that have it, if not every run (``Where``).

The order of the entries is the order of the table columns (and of the CSVs' columns). A prior's
own test metrics (``Prior.metrics``) are those its class declares in ``Prior.metric_names``;
an entry here with ``where=PRIOR_OWN`` gives one of them a column.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from vae_sweeps.errors import UserError


@functools.lru_cache(maxsize=None)
def _prior_class(target: str | None) -> type:
    from hydra.utils import get_class

    target = target or "vae_sweeps.priors.Prior"  # by name, as a run's params name it: no import here
    try:
        return get_class(target)
    except Exception as err:  # a user's prior whose package is not on the path here
        raise UserError(f"prior._target_={target} cannot be imported ({err}): put its package on the path "
                        "(PYTHONPATH=...), or leave its runs out with a filter (prior.name=...).") from err


def prior_class(settings: Mapping[str, str]) -> type:
    """The class of a run's prior, from its params (``prior._target_``; the base ``Prior``
    for a run that names none): what the prior declares without building one."""
    return _prior_class(settings.get("prior._target_"))


@dataclass(frozen=True)
class Where:
    """The runs that have a metric: ``test(settings, name)`` on a run's params (completed with
    today's defaults, as the back-fill reads them). ``axis``: the param prefix that decides it,
    so that a table with no run yet shows the column only where its rows vary that axis (None:
    every table)."""

    test: Callable[[Mapping[str, str], str], bool]
    axis: str | None = None


def _has_elbo(settings: Mapping[str, str]) -> bool:
    return not prior_class(settings).deterministic  # a plain autoencoder has no ELBO


def _own_objective(settings: Mapping[str, str]) -> bool:
    """Whether the run's own likelihood (-c * Recon) is another than the Bernoulli with c = 1
    (evaluation.likelihoods): another loss than BCE, or c != 1."""
    return settings.get("loss.name", "bce") != "bce" or float(settings.get("loss.c", 1.0)) != 1.0


EVERY_RUN = Where(lambda settings, name: True)
WITH_ELBO = Where(lambda settings, name: _has_elbo(settings))
OWN_OBJECTIVE = Where(lambda settings, name: _has_elbo(settings) and _own_objective(settings), axis="loss.")
PRIOR_OWN = Where(lambda settings, name: name in prior_class(settings).metric_names, axis="prior")


@dataclass(frozen=True)
class Metric:
    """One end-of-run metric (the module docstring says what each field means)."""

    name: str
    part: str
    header: str | None = None
    digits: int = 2
    where: Where = EVERY_RUN

    @property
    def key(self) -> str:
        """Its MLflow metric (a pattern, where the name has ``<k>``)."""
        return f"test/{self.name}"

    def found_in(self, logged: Mapping[str, float]) -> bool:
        """Whether ``logged`` (a run's metrics) has it; for ``<k>``, one metric of the pattern."""
        if "<k>" not in self.name:
            return self.key in logged
        pattern = re.compile(re.escape(self.key).replace(re.escape("<k>"), r"\d+"))
        return any(pattern.fullmatch(key) for key in logged)


# ELBO and log p(x) are under the Bernoulli likelihood with c = 1 in every run; the *_objective
# ones are the same bounds of the run's own training objective (-c * Recon), logged only where
# that is another (evaluation.py says what each metric is, judge.py the judge's).
METRICS = (
    Metric("elbo", "evaluation", "ELBO (Bernoulli, c = 1)", where=WITH_ELBO),
    Metric("log_px", "evaluation", "log p(x), IW (Bernoulli, c = 1)", where=WITH_ELBO),
    Metric("elbo_objective", "evaluation", "ELBO of the training objective", where=OWN_OBJECTIVE),
    Metric("log_px_objective", "evaluation", "IW bound of the training objective", where=OWN_OBJECTIVE),
    Metric("recon_bce", "evaluation", "BCE"),
    Metric("recon_l2", "evaluation", "L2"),
    Metric("recon_l1", "evaluation", "L1"),
    Metric("sharpness", "evaluation", "sharpness", digits=3),
    Metric("active_units", "evaluation", "active units", digits=1),
    Metric("knn_accuracy", "evaluation", "k-NN acc.", digits=3),
    Metric("knn_accuracy_pca2", "evaluation", "k-NN acc., pixels' PCA-2", digits=3),
    Metric("kl_mc", "evaluation", "KL (MC)", where=PRIOR_OWN),
    Metric("kl_tight_gap", "evaluation", "tight - MC", where=PRIOR_OWN),
    Metric("kl_bound_gap", "evaluation", "bound - MC", where=PRIOR_OWN),
    Metric("judged_accuracy", "judge", "judged acc.", digits=3),
    Metric("classes_drawn", "judge", "classes drawn", digits=1),
    Metric("sample_class_entropy", "judge", "sample class entropy"),
    Metric("judged_accuracy_<k>", "judge"),
    Metric("drawn_share_<k>", "judge"),
)


def shown() -> list[Metric]:
    """The metrics with a column in the tables, in the tables' order."""
    return [metric for metric in METRICS if metric.header is not None]


def expected(settings: Mapping[str, str]) -> list[Metric]:
    """The metrics a run with these params has once evaluated: the entries that apply to it,
    and each of its prior's own metrics (``Prior.metric_names``) that no entry names."""
    applying = [metric for metric in METRICS if metric.where.test(settings, metric.name)]
    named = {metric.name for metric in METRICS}
    return applying + [Metric(name, "evaluation", where=PRIOR_OWN)
                       for name in prior_class(settings).metric_names if name not in named]


def lacking(logged: Mapping[str, float], settings: Mapping[str, str]) -> dict[str, list[str]]:
    """The part -> the names of its metrics that a run with these params and ``logged``
    metrics lacks; {} for a run that has every one."""
    parts: dict[str, list[str]] = {}
    for metric in expected(settings):
        if not metric.found_in(logged):
            parts.setdefault(metric.part, []).append(metric.name)
    return parts
