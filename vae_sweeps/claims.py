"""The study's claims, checked against the tracked runs (``experiments/claims.yaml``).

Each claim names table cells (``[table, row value]``) and a test; the report hands this module
the runs of each cell (one per seed) and gets back, per claim, the numbers with n and a verdict:
**supported**, **contradicted** or **inconclusive**, with the reason. Differences between cells
use every seed: the mean difference with a 95% interval by Welch's t (the variance ratio by the
F distribution for ``more_spread``), and the verdict follows from where the interval lies.
A claim whose cells have no finished run says which experiment fills them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

CLAIMS_FILE = Path(__file__).resolve().parents[1] / "experiments" / "claims.yaml"
LEVEL = 0.95
SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"


@dataclass
class Verdict:
    verdict: str
    evidence: str  # our numbers, with n
    why: str = ""
    missing: list[str] = field(default_factory=list)  # experiments that would fill missing cells


def welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(mean difference a - b, lower and upper end of its 95% interval) by Welch's t."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = a.mean() - b.mean(), math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + LEVEL / 2, df) * se
    return diff, diff - half, diff + half


def one_sample(a: np.ndarray) -> tuple[float, float, float]:
    """(mean, lower and upper end of its 95% t interval)."""
    half = stats.t.ppf(0.5 + LEVEL / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    return a.mean(), a.mean() - half, a.mean() + half


def variance_ratio(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(var(a) / var(b), lower and upper end of its 95% interval by the F distribution)."""
    ratio = a.var(ddof=1) / b.var(ddof=1) if b.var(ddof=1) > 0 else math.inf
    f = stats.f(len(a) - 1, len(b) - 1)
    return ratio, ratio / f.ppf(0.5 + LEVEL / 2), ratio / f.ppf(0.5 - LEVEL / 2)


def _values(group: pd.DataFrame, metric: str) -> np.ndarray:
    column = f"metrics.test/{metric}"
    return group[column].dropna().to_numpy(float) if column in group else np.array([])


def _name(cell: list) -> str:
    table, value = cell
    return f"{table} {'/'.join(str(v) for v in value if v is not None) if isinstance(value, list) else value}"


def _interval(verb: str, diff: float, low: float, high: float, n: tuple[int, int]) -> str:
    return f"{verb} {diff:+.3g}, 95% interval [{low:+.3g}, {high:+.3g}] (Welch's t; n = {n[0]} and {n[1]})"


def check(spec: dict, cell) -> Verdict:
    """The verdict of one claim (or part); ``cell(table, value)`` gives a cell's runs."""
    if spec["test"] == "all_of":
        return _all_of([check(part, cell) for part in spec["parts"]], [p.get("label", p["test"]) for p in spec["parts"]])
    groups = {side: cell(*spec[side]) for side in ("a", "b") if side in spec}
    missing = sorted({_experiment(spec[side]) for side, group in groups.items() if group.empty})
    if missing:
        cells = ", ".join(_name(spec[side]) for side, group in groups.items() if group.empty)
        return Verdict(INCONCLUSIVE, f"no finished runs for {cells}", "no runs yet", missing)
    return TESTS[spec["test"]](spec, groups)


def _experiment(cell: list) -> str:
    return cell[0]  # replaced by the table's experiment in checked_claims


def paired(test):
    """A test of two cells' values (a, b, a label of both), given only when each side has the
    2 or more seeds that an interval needs; otherwise the verdict is inconclusive."""
    def run(spec: dict, groups: dict) -> Verdict:
        a, b = (_values(groups[s], spec["metric"]) for s in ("a", "b"))
        label = f"test/{spec['metric']}: {_name(spec['a'])} {a.mean():.4g} (n = {len(a)}) vs {_name(spec['b'])} " \
                f"{b.mean():.4g} (n = {len(b)})" if len(a) and len(b) else f"test/{spec['metric']} not logged"
        if min(len(a), len(b)) < 2:
            return Verdict(INCONCLUSIVE, label, f"too few seeds for an interval (n = {len(a)} and {len(b)}; "
                                                "2 or more each)")
        return test(spec, a, b, label)

    return run


@paired
def _lower_or_higher(spec: dict, a: np.ndarray, b: np.ndarray, label: str) -> Verdict:
    sign = -1 if spec["test"] == "lower" else 1
    margin = spec.get("margin", 0.0)
    diff, low, high = welch(a, b)
    evidence = f"{label}; " + _interval("difference", diff, low, high, (len(a), len(b)))
    if (sign < 0 and high < -margin) or (sign > 0 and low > margin):
        return Verdict(SUPPORTED, evidence, f"the interval lies beyond {sign * margin:+g}")
    if (sign < 0 and low > 0) or (sign > 0 and high < 0):
        return Verdict(CONTRADICTED, evidence, "the interval lies wholly on the other side of 0")
    return Verdict(INCONCLUSIVE, evidence, f"the interval reaches {sign * margin:+g}: within the spread over seeds")


@paired
def _not_lower(spec: dict, a: np.ndarray, b: np.ndarray, label: str) -> Verdict:
    margin = spec.get("margin", 0.0)
    diff, low, high = welch(a, b)
    evidence = f"{label}; " + _interval("difference", diff, low, high, (len(a), len(b)))
    if low > -margin:
        return Verdict(SUPPORTED, evidence, f"no gain beyond {margin:g}: the interval lies above {-margin:+g}")
    if high < -margin:
        return Verdict(CONTRADICTED, evidence, f"a gain beyond {margin:g}: the interval lies below {-margin:+g}")
    return Verdict(INCONCLUSIVE, evidence, f"the interval straddles {-margin:+g}")


@paired
def _more_spread(spec: dict, a: np.ndarray, b: np.ndarray, label: str) -> Verdict:
    ratio, low, high = variance_ratio(a, b)
    evidence = (f"{label}; std {a.std(ddof=1):.3g} vs {b.std(ddof=1):.3g}, variance ratio {ratio:.3g}, "
                f"95% interval [{low:.3g}, {high:.3g}] (F test; n = {len(a)} and {len(b)})")
    if low > 1:
        return Verdict(SUPPORTED, evidence, "the interval lies above 1")
    if high < 1:
        return Verdict(CONTRADICTED, evidence, "the interval lies below 1")
    return Verdict(INCONCLUSIVE, evidence, "the interval contains 1 (few seeds give a wide interval)")


def _above(spec: dict, groups: dict) -> Verdict:
    a = _values(groups["a"], spec["metric"])
    if len(a) < 2:
        return Verdict(INCONCLUSIVE, f"test/{spec['metric']} of {_name(spec['a'])}: n = {len(a)}",
                       "too few seeds for an interval (2 or more)")
    mean, low, high = one_sample(a)
    threshold = spec["threshold"]
    evidence = (f"test/{spec['metric']} of {_name(spec['a'])}: {mean:.4g}, 95% interval [{low:.4g}, {high:.4g}] "
                f"(t; n = {len(a)}); threshold {threshold:g}")
    if low > threshold:
        return Verdict(SUPPORTED, evidence, "the interval lies above the threshold")
    if high < threshold:
        return Verdict(CONTRADICTED, evidence, "the interval lies below the threshold")
    return Verdict(INCONCLUSIVE, evidence, "the interval contains the threshold")


def _draws(spec: dict, groups: dict) -> Verdict:
    group = groups["a"]
    tags = [t for t in group.get("classes_drawn", pd.Series(dtype=object)).dropna()]
    if not tags:
        return Verdict(INCONCLUSIVE, f"{_name(spec['a'])}: no judged runs", "its runs lack the judge's metrics: "
                       "python -m vae_sweeps.evaluate fills them")
    absent, at_least = set(spec.get("absent", [])), spec.get("at_least", 0)
    drawn = [set() if tag == "none" else {int(k) for k in tag.split()} for tag in tags]
    holds = [not (d & absent) and len(d) >= at_least for d in drawn]
    evidence = f"{_name(spec['a'])}: classes drawn per seed " + "; ".join(
        " ".join(map(str, sorted(d))) or "none" for d in drawn) + f" (n = {len(drawn)})"
    if all(holds) and len(holds) >= 2:
        return Verdict(SUPPORTED, evidence, "true for every seed")
    if not any(holds):
        return Verdict(CONTRADICTED, evidence, "false for every seed")
    return Verdict(INCONCLUSIVE, evidence, "true for some seeds only" if any(holds) else "one seed only")


def _all_of(parts: list[Verdict], labels: list[str]) -> Verdict:
    verdicts = [p.verdict for p in parts]
    evidence = " | ".join(f"{label}: {p.evidence} → {p.verdict}" for label, p in zip(labels, parts))
    missing = sorted({m for p in parts for m in p.missing})
    if all(v == SUPPORTED for v in verdicts):
        return Verdict(SUPPORTED, evidence, "every part is supported", missing)
    if CONTRADICTED in verdicts:
        return Verdict(CONTRADICTED, evidence, "contradicted in: " + ", ".join(
            label for label, v in zip(labels, verdicts) if v == CONTRADICTED), missing)
    return Verdict(INCONCLUSIVE, evidence, "inconclusive in: " + ", ".join(
        label for label, v in zip(labels, verdicts) if v == INCONCLUSIVE), missing)


TESTS = {"lower": _lower_or_higher, "higher": _lower_or_higher, "not_lower": _not_lower, "above": _above,
         "more_spread": _more_spread, "draws": _draws}


def checked_claims(cell, experiments: dict[str, str]) -> list[tuple[dict, Verdict]]:
    """Every claim of CLAIMS_FILE with its verdict; ``experiments`` maps a table to the
    experiment that fills it (for the missing cells' commands)."""
    result = []
    for spec in yaml.safe_load(CLAIMS_FILE.read_text())["claims"]:
        verdict = check(spec, cell)
        verdict.missing = sorted({experiments.get(table, table) for table in verdict.missing})
        result.append((spec, verdict))
    return result


def tables_of(spec: dict) -> list[str]:
    """The tables whose cells a claim (or its parts) compares, in the order it names them."""
    cells = [part[side] for part in spec.get("parts", [spec]) for side in ("a", "b") if side in part]
    return list(dict.fromkeys(table for table, _ in cells))


def headline(spec: dict, v: Verdict) -> str:
    """A claim and its verdict in one line (Markdown)."""
    return f"**{spec['id']}. {spec['claim']}** — **{v.verdict}** ({v.why})."


def markdown(checked: list[tuple[dict, Verdict]]) -> str:
    lines = []
    for spec, v in checked:
        lines += [headline(spec, v), "", f"- Our numbers: {v.evidence}."]
        if v.missing:
            lines.append("- To fill its runs: " + "; ".join(f"`python -m vae_sweeps experiment={e}`" for e in v.missing))
        lines.append("")
    return "\n".join(lines)


def table(checked: list[tuple[dict, Verdict]]) -> pd.DataFrame:
    return pd.DataFrame([{"id": s["id"], "claim": s["claim"], "verdict": v.verdict, "why": v.why,
                          "evidence": v.evidence, "fill": " ".join(v.missing)} for s, v in checked])
