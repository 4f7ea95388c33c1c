"""The study's claims, checked against the tracked runs (``experiments/claims.yaml``).

Each claim names table cells (``[table, row value]``) and a test; the report hands this module
the runs of each cell (one per seed) and gets back, per claim, the numbers with n and a verdict:
**supported**, **partly supported**, **contradicted** or **inconclusive**, with the reason in words.

Most tests are interval tests: the mean difference a - b over seeds with its 95% interval by
Welch's t, read against a margin (one per kind of quantity, ``margins`` in claims.yaml) and
against 0. Each also gets the one-sided p-value of the decision it makes (or could make), and
the interval tests of all claims form one family: Holm-Bonferroni at one-sided 2.5% (the level
of the 95% intervals) gives each verdict its adjusted reading. An undecided interval test says
how many seeds per arm would decide it, and the command that adds them. The claim about which
digits a decoder draws is graded per digit instead (``drawn``) and lies outside the family.
A claim whose cells have no finished run says which experiment fills them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from vae_sweeps.identity import PROJECT
from vae_sweeps.tables import fill_command

CLAIMS_FILE = PROJECT / "experiments" / "claims.yaml"
LEVEL = 0.95
ALPHA = (1 - LEVEL) / 2  # one-sided: a 95% interval beyond a bound is a one-sided test at 2.5%
POWER = 0.8
SUPPORTED, PARTLY, CONTRADICTED, INCONCLUSIVE = "supported", "partly supported", "contradicted", "inconclusive"
INTERVAL_TESTS = ("lower", "higher", "not_lower", "equivalent")


@dataclass
class Verdict:
    verdict: str
    evidence: str  # our numbers, with n
    why: str = ""  # the reason, in words
    missing: list[str] = field(default_factory=list)  # experiments that would fill missing cells
    adjusted: str = ""  # the verdict after Holm over the family (checked_claims); outside it, the verdict
    beyond_zero: str = ""  # interval tests: whether the interval lies beyond 0 (see each test)
    p_value: float | None = None  # interval tests: the one-sided p-value of the decision made (or pointed to)
    power: str = ""  # undecided interval tests: the seeds per arm that would decide, and the commands
    parts: list[Verdict] = field(default_factory=list)  # all_of: each part's verdict
    labels: list[str] = field(default_factory=list)  # all_of: each part's label


def load() -> dict:
    """claims.yaml: its margins, the drawn threshold and the claims."""
    return yaml.safe_load(CLAIMS_FILE.read_text())


# ---------------------------------------------------------------------------- statistics


@dataclass
class Difference:
    """a - b over seeds: the mean difference, its standard error and Welch-Satterthwaite df."""
    diff: float
    se: float
    df: float

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray) -> Difference:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else math.inf
        return cls(a.mean() - b.mean(), se, df)

    def interval(self) -> tuple[float, float]:
        half = stats.t.ppf(0.5 + LEVEL / 2, self.df) * self.se if self.se > 0 else 0.0
        return self.diff - half, self.diff + half

    def beyond(self, bound: float, side: int) -> bool:
        """Whether the 95% interval lies wholly above (side 1) or below (side -1) ``bound``."""
        low, high = self.interval()
        return low > bound if side > 0 else high < bound

    def p_beyond(self, bound: float, side: int) -> float:
        """The one-sided p-value against "the difference is not above (side 1) / below (side -1)
        ``bound``": below 2.5% exactly when ``beyond`` holds."""
        if self.se == 0:
            return 0.0 if side * (self.diff - bound) > 0 else 1.0
        return float(stats.t.sf(side * (self.diff - bound) / self.se, self.df))


def welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(mean difference a - b, lower and upper end of its 95% interval) by Welch's t."""
    d = Difference.of(a, b)
    return (d.diff, *d.interval())


def holm(p_values: list[float], alpha: float = ALPHA) -> list[bool]:
    """Which hypotheses of a family Holm's step-down rejects: the i-th smallest p-value (i from 0)
    passes if it is at most alpha / (m - i) and every smaller one passed."""
    passed = [False] * len(p_values)
    for i, k in enumerate(sorted(range(len(p_values)), key=lambda k: p_values[k])):
        if p_values[k] > alpha / (len(p_values) - i):
            break
        passed[k] = True
    return passed


def seeds_for_power(effect: float, sd_a: float, sd_b: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """Seeds per arm for ``power`` to show a difference ``effect`` beyond its bound with a one-sided
    test at ``alpha``, by the normal approximation n = (z_(1-alpha) + z_power)^2 (sd_a^2 + sd_b^2) / effect^2."""
    z = stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)
    return math.ceil(z ** 2 * (sd_a ** 2 + sd_b ** 2) / effect ** 2)


# ---------------------------------------------------------------------------- cells and words


def _values(group: pd.DataFrame, metric: str) -> np.ndarray:
    """A cell's values of ``metric`` over seeds: metrics.<metric> for a name with a "/"
    (val/loss_fluctuation), metrics.test/<metric> otherwise."""
    column = f"metrics.{_metric(metric)}"
    return group[column].dropna().to_numpy(float) if column in group else np.array([])


def _metric(metric: str) -> str:
    return metric if "/" in metric else f"test/{metric}"


def _name(cell: list) -> str:
    table, value = cell
    return f"{table} {'/'.join(str(v) for v in value if v is not None) if isinstance(value, list) else value}"


def _mean(quantity: str, values: np.ndarray) -> str:
    return f"{quantity} {values.mean():.4g} (n = {len(values)})" if len(values) else f"{quantity}: not logged"


def _and(items) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _experiment(cell: list) -> str:
    return cell[0]  # replaced by the table's experiment in checked_claims


def family_size(specs: list[dict]) -> int:
    """The interval tests among the claims (each part of an all_of counts)."""
    return sum(part["test"] in INTERVAL_TESTS for spec in specs for part in spec.get("parts", [spec]))


# ---------------------------------------------------------------------------- the tests


def check(spec: dict, cell, settings=None, rules: dict | None = None) -> Verdict:
    """The verdict of one claim (or part); ``cell(table, value)`` gives a cell's runs,
    ``settings(table, value)`` its settings (for the commands that add seeds), ``rules`` the
    margins and the drawn threshold (claims.yaml by default)."""
    rules = rules or load()
    if spec["test"] == "all_of":
        parts = [check(part, cell, settings, rules) for part in spec["parts"]]
        return _all_of(parts, [p.get("label", p["test"]) for p in spec["parts"]])
    sides = {"a": spec["a"]} if spec["test"] == "drawn" else {"a": spec["a"], "b": spec.get("b", spec["a"])}
    groups = {side: cell(*c) for side, c in sides.items()}
    empty = [side for side, group in groups.items() if group.empty]
    if empty:
        cells = _and(dict.fromkeys(_name(sides[side]) for side in empty))
        return Verdict(INCONCLUSIVE, f"no finished runs for {cells}", f"no finished runs for {cells} yet",
                       sorted({_experiment(sides[side]) for side in empty}))
    if spec["test"] == "drawn":
        return _drawn(spec, groups["a"], rules["drawn_threshold"]["value"])
    return _interval_test(spec, groups, sides, settings, rules)


def _interval_test(spec: dict, groups: dict, sides: dict, settings, rules: dict) -> Verdict:
    """An interval test (TESTS) of a's ``metric`` against b's ``metric_b`` (default: the same),
    given when each side has the 2 or more seeds that an interval needs."""
    metric_a, metric_b = spec["metric"], spec.get("metric_b", spec["metric"])
    a, b = _values(groups["a"], metric_a), _values(groups["b"], metric_b)
    x, x_b = (f"{_metric(metric)} of {_name(sides[side])}" for metric, side in ((metric_a, "a"), (metric_b, "b")))
    y = f"that of {_name(sides['b'])}" if metric_b == metric_a else x_b  # b's quantity, in a sentence
    label = f"{_mean(x, a)} vs {_mean(x_b, b)}"
    if min(len(a), len(b)) < 2:
        return Verdict(INCONCLUSIVE, label,
                       f"too few seeds for an interval (n = {len(a)} and {len(b)}; 2 or more each)")
    kind = spec["margin"]
    m = rules["margins"][kind]["value"]
    d = Difference.of(a, b)
    low, high = d.interval()
    verdict, why, p, beyond_zero, need = TESTS[spec["test"]](d, m, f"{m:g} (the {kind} margin)", x, y)
    evidence = (f"{label}; difference {d.diff:+.3g}, 95% interval [{low:+.3g}, {high:+.3g}] (Welch's t, "
                f"df {d.df:.3g}); margin {m:g} ({kind}); beyond 0: {beyond_zero}; one-sided p = {p:.2g}")
    power = ""
    if verdict == INCONCLUSIVE:
        power = _power(need, a, b, groups, sides, settings, family_size(rules.get("claims", [])))
    return Verdict(verdict, evidence, why, beyond_zero=beyond_zero, p_value=p, power=power)


# Each interval test: (difference, margin, the margin in words, a's and b's quantity in words) ->
# (verdict, why, the p-value of the decision made or pointed to, beyond 0, what more seeds could
# decide: (the decision, the observed distance past its bound) or a sentence saying none).

def _lower_or_higher(sign: int):
    word, other = ("higher", "lower") if sign > 0 else ("lower", "higher")

    def test(d: Difference, m: float, margin: str, x: str, y: str):
        """Decided at the margin, both ways: supported beyond it on the claimed side, contradicted
        wholly short of it (a real difference smaller than the margin, none, or the opposite)."""
        p_support, p_contradict = d.p_beyond(sign * m, sign), d.p_beyond(sign * m, -sign)
        beyond_zero = "yes" if d.beyond(0.0, sign) else "no"
        effect = sign * d.diff
        need = (("support it", effect - m) if effect > m else ("contradict it", m - effect) if effect < m else
                f"the observed difference {d.diff:+.3g} lies on the margin: more seeds would not decide it")
        if d.beyond(sign * m, sign):
            return SUPPORTED, f"{x} is {word} than {y} by more than {margin}", p_support, beyond_zero, need
        if d.beyond(sign * m, -sign):
            why = (f"{x} is {word} than {y}, but by less than {margin}" if beyond_zero == "yes" else
                   f"{x} is {other} than {y}" if d.beyond(0.0, -sign) else
                   f"{x} is not {word} than {y} by more than {margin}")
            return CONTRADICTED, why, p_contradict, beyond_zero, need
        return (INCONCLUSIVE, f"undecided whether {x} is {word} than {y} by more than {margin}: the interval "
                f"straddles {sign * m:+g}", min(p_support, p_contradict), beyond_zero, need)

    return test


def _not_lower(d: Difference, m: float, margin: str, x: str, y: str):
    p_support, p_contradict = d.p_beyond(-m, 1), d.p_beyond(-m, -1)
    beyond_zero = "yes" if d.beyond(0.0, 1) else "no"
    need = ("support it", d.diff + m) if d.diff > -m else ("contradict it", -m - d.diff)
    if d.beyond(-m, 1):
        return SUPPORTED, f"{x} is not lower than {y} by more than {margin}", p_support, beyond_zero, need
    if d.beyond(-m, -1):
        return CONTRADICTED, f"{x} is lower than {y} by more than {margin}", p_contradict, beyond_zero, need
    return (INCONCLUSIVE, f"undecided whether {x} is lower than {y} by more than {margin}: the interval straddles "
            f"{-m:+g}", min(p_support, p_contradict), beyond_zero, need)


def _equivalent(d: Difference, m: float, margin: str, x: str, y: str):
    """TOST: equivalent when both one-sided tests reject (the interval lies inside (-m, +m)); its
    p-value is the larger of the two."""
    p_support = max(d.p_beyond(-m, 1), d.p_beyond(m, -1))
    p_contradict = min(d.p_beyond(m, 1), d.p_beyond(-m, -1))
    beyond_zero = "yes (above)" if d.beyond(0.0, 1) else "yes (below)" if d.beyond(0.0, -1) else "no"
    if abs(d.diff) != m:
        need = ("show equivalence", m - abs(d.diff)) if abs(d.diff) < m else ("contradict it", abs(d.diff) - m)
    else:
        need = f"the observed difference {d.diff:+.3g} lies on the margin: more seeds would not decide it"
    if d.beyond(-m, 1) and d.beyond(m, -1):
        return SUPPORTED, f"{x} is within ±{margin} of {y}", p_support, beyond_zero, need
    if d.beyond(m, 1) or d.beyond(-m, -1):
        word = "higher" if d.diff > 0 else "lower"
        return CONTRADICTED, f"{x} is {word} than {y} by more than {margin}", p_contradict, beyond_zero, need
    return (INCONCLUSIVE, f"undecided whether {x} is within ±{margin} of {y}: the interval is neither inside "
            f"(-{m:g}, +{m:g}) nor wholly beyond it", min(p_support, p_contradict), beyond_zero, need)


def _power(need, a: np.ndarray, b: np.ndarray, groups: dict, sides: dict, settings, family: int) -> str:
    """The seeds per arm that give 80% power, at the observed difference and spreads, to the
    decision the observed difference points to, and the commands that add them; or why none would."""
    if isinstance(need, str):
        return f"No number of seeds would decide it: {need}."
    decision, effect = need
    sd_a, sd_b = a.std(ddof=1), b.std(ddof=1)
    now = max(len(a), len(b))
    n = max(seeds_for_power(effect, sd_a, sd_b), now + 1)  # undecided now: at least one seed more
    strict = ""
    if family > 1:
        at_holm = max(seeds_for_power(effect, sd_a, sd_b, ALPHA / family), now + 1)
        strict = f"; {at_holm} at Holm's strictest level, 2.5%/{family}"
    commands = []
    for side in ("a", "b"):
        group = groups[side]
        have = group["seed"].max() + 1 if "seed" in group and len(group) else len(group)
        seeds = list(range(int(have), n))
        if not seeds or (side == "b" and sides["b"] == sides["a"]):
            continue
        listed = seeds if len(seeds) <= 5 else [f"range({seeds[0]},{n})"]  # Hydra's sweep of seeds[0] to n - 1
        commands.append(f"`{fill_command(settings(*sides[side]), listed)}`" if settings else
                        f"seeds {seeds[0]}-{seeds[-1]} of {_name(sides[side])}")
    return (f"To {decision}: about {n} seeds per arm give 80% power at the observed difference and spreads "
            f"(normal approximation, one-sided 2.5% unadjusted{strict}): " + "; ".join(commands) + ".")


def _drawn(spec: dict, group: pd.DataFrame, threshold: float) -> Verdict:
    """Graded per digit: a seed draws digit k when test/drawn_share_<k> (the share of decoded
    points the judge assigns to k with confidence >= 0.9) is at least ``threshold``. Each listed
    digit is rarely drawn (by no seed), drawn by every seed, or by some seeds. ``expect`` says
    what the claim expects of every listed digit ("rarely" or "every"): supported if that holds
    for each, contradicted if the opposite holds for each, partly supported otherwise."""
    digits, where = spec["digits"], spec.get("label", _name(spec["a"]))
    columns = [f"metrics.test/drawn_share_{k}" for k in digits]
    if not all(c in group for c in columns) or group[columns].dropna().empty:
        return Verdict(INCONCLUSIVE, f"{where}: no drawn shares", f"the runs at {where} lack test/drawn_share_<k>: "
                       "python -m vae_sweeps.backfill fills them")
    shares = group[columns].dropna().set_axis(digits, axis=1)  # a row per seed, a column per digit
    n = len(shares)
    evidence = (f"{_name(spec['a'])}: the share of decoded points judged k with confidence >= 0.9, per seed "
                f"(n = {n}; drawn at >= {threshold:g}): "
                + "; ".join(f"{k}: " + " ".join(f"{s:.3f}" for s in shares[k]) for k in digits))
    counts = {k: int((shares[k] >= threshold).sum()) for k in digits}
    rare = [k for k in digits if counts[k] == 0]
    every = [k for k in digits if counts[k] == n]

    def phrase(ks: list[int], predicate: str) -> tuple[str, str]:
        """("<digits> are <predicate>", the range of their shares)."""
        values = shares[ks].to_numpy()
        subject = "every digit is" if len(ks) == 10 else f"{_and(ks)} {'is' if len(ks) == 1 else 'are'}"
        detail = f"at most {values.max():.3f}" if not counts[ks[0]] else f"{values.min():.2f}-{values.max():.2f}"
        return f"{subject} {predicate}", detail

    ends = [phrase(rare, "rarely drawn") if rare else None, phrase(every, "drawn by every seed") if every else None]
    if spec["expect"] == "every":
        ends.reverse()  # what the claim expects first, its opposite last
    some = [phrase([k], f"drawn by {counts[k]} of {n} seeds") for k in digits if 0 < counts[k] < n]
    phrases = [p for p in [ends[0], *some, ends[1]] if p]
    why = "; ".join(f"{said}{f' at {where}' if i == 0 else ''} (shares {detail})"
                    for i, (said, detail) in enumerate(phrases))
    holds, fails = (rare, every) if spec["expect"] == "rarely" else (every, rare)
    if n < 2:
        return Verdict(INCONCLUSIVE, evidence, f"one seed only (2 or more to speak of every seed): {why}")
    if len(holds) == len(digits):
        return Verdict(SUPPORTED, evidence, why)
    if len(fails) == len(digits):
        return Verdict(CONTRADICTED, evidence, why)
    return Verdict(PARTLY, evidence, why)


def combine(verdicts: list[str]) -> str:
    """The verdict of a claim made of parts: supported if every part is; inconclusive if every part
    is; contradicted if some part is and none is supported or partly supported (a claim that is
    false in one part and undecided in the rest is false); partly supported otherwise (some part
    holds, wholly or in part, and some does not, or is undecided)."""
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    if all(v == INCONCLUSIVE for v in verdicts):
        return INCONCLUSIVE
    if CONTRADICTED in verdicts and not {SUPPORTED, PARTLY} & set(verdicts):
        return CONTRADICTED
    return PARTLY


def _all_of(parts: list[Verdict], labels: list[str]) -> Verdict:
    evidence = " | ".join(f"{label}: {p.evidence} → {p.verdict}" for label, p in zip(labels, parts))
    why = "; ".join(dict.fromkeys(p.why for p in parts))
    missing = sorted({m for p in parts for m in p.missing})
    return Verdict(combine([p.verdict for p in parts]), evidence, why, missing, parts=parts, labels=labels)


# Every test by name: the interval tests (called by _interval_test) and the graded one (_drawn).
TESTS = {"lower": _lower_or_higher(-1), "higher": _lower_or_higher(1), "not_lower": _not_lower,
         "equivalent": _equivalent, "drawn": _drawn}


# ---------------------------------------------------------------------------- the claims


def adjust(checked: list[tuple[dict, Verdict]], alpha: float = ALPHA) -> int:
    """Holm over the family of interval tests: each keeps its verdict as ``adjusted`` if its
    p-value passes Holm's step-down, else reads inconclusive (a test without a p-value, its cells
    unfilled, counts and never passes). Tests outside the family keep their verdict; an all_of
    combines its parts' adjusted verdicts. Returns the family's size."""
    elementary = [(part, v) for spec, verdict in checked
                  for part, v in zip(spec.get("parts", [spec]), verdict.parts or [verdict])]
    family = [v for part, v in elementary if part["test"] in INTERVAL_TESTS]
    passed = holm([1.0 if v.p_value is None else v.p_value for v in family], alpha)
    for _, v in elementary:
        v.adjusted = v.verdict
    for v, ok in zip(family, passed):
        v.adjusted = v.verdict if ok else INCONCLUSIVE
    for _, verdict in checked:
        if verdict.parts:
            verdict.adjusted = combine([p.adjusted for p in verdict.parts])
    return len(family)


def checked_claims(cell, experiments: dict[str, str], settings=None, left_out=frozenset()
                   ) -> list[tuple[dict, Verdict]]:
    """Every claim of CLAIMS_FILE with its verdict and its Holm-adjusted one; ``experiments`` maps
    a table to the experiment that fills it (for the missing cells' commands), ``settings(table,
    value)`` gives a cell's settings (for the commands that add seeds; without it the seeds are named).
    The claims on a table in ``left_out`` are left out, of the family too (the report leaves
    out those on a tuned table without runs: they would change every other verdict's Holm level)."""
    rules = load()
    rules["claims"] = [spec for spec in rules["claims"] if not set(tables_of(spec)) & set(left_out)]
    result = []
    for spec in rules["claims"]:
        verdict = check(spec, cell, settings, rules)
        verdict.missing = sorted({experiments.get(table, table) for table in verdict.missing})
        result.append((spec, verdict))
    adjust(result)
    return result


def tables_of(spec: dict) -> list[str]:
    """The tables whose cells a claim (or its parts) compares, in the order it names them."""
    cells = [part.get(side, part["a"]) for part in spec.get("parts", [spec]) for side in ("a", "b")]
    return list(dict.fromkeys(table for table, _ in cells))


def headline(spec: dict, v: Verdict) -> str:
    """A claim and its verdict (and the Holm-adjusted one) in one line (Markdown)."""
    adjusted = f", Holm-adjusted **{v.adjusted}**" if v.adjusted else ""
    return f"**{spec['id']}. {spec['claim']}** — **{v.verdict}**{adjusted} ({v.why})."


def family_note(checked: list[tuple[dict, Verdict]]) -> str:
    """The line that says what "adjusted" means, with the family's size and the claims outside it."""
    specs = [spec for spec, _ in checked]
    outside = [spec["id"] for spec in specs if any(part["test"] not in INTERVAL_TESTS and part["test"] != "all_of"
                                                   for part in spec.get("parts", [spec]))]
    return (f"Adjusted: Holm-Bonferroni over the {family_size(specs)} interval tests of this family at one-sided 2.5%; "
            "a verdict that does not survive it reads inconclusive."
            + (f" The graded tests of claim {_and(outside)} are no interval tests and lie outside the family."
               if outside else ""))


def markdown(checked: list[tuple[dict, Verdict]]) -> str:
    lines = [family_note(checked), ""]
    for spec, v in checked:
        lines += [headline(spec, v), ""]
        if v.parts:
            for label, p in zip(v.labels, v.parts):
                adjusted = f", adjusted {p.adjusted}" if p.adjusted else ""
                lines.append(f"- {label}: {p.evidence} → {p.verdict}{adjusted}.")
                lines += [f"  - {p.power}"] if p.power else []
        else:
            lines.append(f"- Our numbers: {v.evidence}.")
            lines += [f"- {v.power}"] if v.power else []
        if v.missing:
            commands = "; ".join(f"`python -m vae_sweeps experiment={e}`" for e in v.missing)
            lines.append(f"- To fill its runs: {commands}")
        if spec.get("reason"):
            lines.append(f"- Why we test it: {spec['reason']}")
        lines.append("")
    return "\n".join(lines)


# The csv's columns of an interval test; an all_of's hold each part's value, labelled.
PER_TEST = {"beyond_zero": lambda v: v.beyond_zero,
            "p_value": lambda v: "" if v.p_value is None else f"{v.p_value:.2g}",
            "power": lambda v: v.power}


def table(checked: list[tuple[dict, Verdict]]) -> pd.DataFrame:
    def column(v: Verdict, value) -> str:
        if not v.parts:
            return value(v)
        return " | ".join(f"{label}: {value(p)}" for label, p in zip(v.labels, v.parts) if value(p) != "")

    return pd.DataFrame([{"id": s["id"], "claim": s["claim"], "verdict": v.verdict, "adjusted": v.adjusted,
                          "why": v.why, **{name: column(v, value) for name, value in PER_TEST.items()},
                          "evidence": v.evidence, "fill": " ".join(v.missing)} for s, v in checked])
