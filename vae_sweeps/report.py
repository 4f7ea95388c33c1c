"""``make report``: the study's tables, claims and figures, rebuilt from the tracked runs.

Reads MLflow only; nothing is trained. The tables are queries over the runs' records
(tables.py), the claims' verdicts come from their cells (claims.py), and the figures tile the
cells' runs' figures or plot their loss curves; ``report.md`` puts them together with the
runs' provenance. The tables and figures are defined in ``experiments/tables.yaml``.

    python -m vae_sweeps.report [--out reports] [--tracking-uri URI] [--experiment NAME] [--readme README.md]
                                [--publish-store results/store/mlflow.db] [--drop IDS] [--check DIR]

``summary.md`` is the report in brief (provenance, the claims' verdicts, every table's test
numbers); ``--readme`` writes it into that file between README_BEGIN and README_END, so that
the README quotes the published results and cannot drift from them (``make results``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.image import imread
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from vae_sweeps import claims, figures, identity, judge, store, study_store, trials
from vae_sweeps.errors import UserError, config_folder, redact
from vae_sweeps.tables import (DASH, FLAG, FLUCTUATION, PROJECT, RECORD, TABLES_FILE, brief_markdown, build_table,
                               cell_key, evaluation_markdown, finished_groups, load_runs, pick_group, row_label,
                               row_settings, studies_markdown, table_markdown, tuned_cell, tuned_markdown,
                               tuning_command)

TUNING_CURVES = "tuning_curves"  # the figure of the tuning studies, drawn where there are trials
# figures/sources.csv: the run whose image each panel of an image figure shows. A figure whose
# images a store no longer holds (the published records carry no artifacts) is kept as the last
# build drew it, if that build drew it from the same runs: it is the figure they would give.
SOURCES, SOURCE_COLUMNS = "sources.csv", ["figure", "panel", "seed", "run_id"]
# The README's block that --readme rewrites with summary.md (make results)
README_BEGIN = "<!-- results:begin (written by `make results` from results/summary.md: edit the report, not this) -->"
README_END = "<!-- results:end -->"


# ---------------------------------------------------------------------------- figures


def panel_images(client: MlflowClient, artifact: str, panels: dict[str, pd.DataFrame], tmp: Path
                 ) -> dict[str, np.ndarray]:
    """Each panel's ``figures/<artifact>.png`` (its group's first seed), where the run has one."""
    images = {}
    for label, group in panels.items():
        run_id = group["run_id"].iloc[0]
        try:
            local = client.download_artifacts(run_id, f"figures/{artifact}.png", str(tmp / run_id))
        except (MlflowException, OSError):  # a run logged before figures existed, say
            continue
        images[label] = imread(local)
    return images


def compose_curves(client: MlflowClient, spec: dict, panels: dict[str, pd.DataFrame]) -> Figure:
    """Each panel's train and val loss per epoch on one axis: the mean over its seeds, in a
    band of one standard deviation over seeds either side."""
    curves = {}
    for label, group in panels.items():
        curves[label] = {}
        for stage in ("train", "val"):
            history = pd.DataFrame([(m.step, m.value) for run_id in group["run_id"]
                                    for m in client.get_metric_history(run_id, f"{stage}/loss")],
                                   columns=["epoch", "value"])
            stats = history.groupby("epoch")["value"].agg(["mean", "std"]).fillna(0.0)
            curves[label][stage] = [(epoch, row["mean"], row["mean"] - row["std"], row["mean"] + row["std"])
                                    for epoch, row in stats.iterrows()]
    seeds = sorted({len(group) for group in panels.values()})
    return figures.loss_curves(curves, f"mean over n = {', '.join(map(str, seeds))} seeds per line; "
                               "the band: ± 1 std over seeds", title=spec["title"])


# ---------------------------------------------------------------------------- the report


def refuse_fewer(done: pd.DataFrame, published: Path, drop: set[str]) -> None:
    """Raise UserError if ``published`` (a report's runs.csv) counts runs that ``done`` lacks, and
    it counts more runs than ``done`` does, unless ``drop`` names each of them (ids or their
    first characters; "all"): an emptier store, a fresh clone's say, would overwrite a
    published report (and the README's summary) with less."""
    if not published.is_file():
        return
    before = pd.read_csv(published, usecols=["run_id"])["run_id"]
    lost = sorted(set(before) - set(done["run_id"] if len(done) else []))
    if len(before) <= len(done) or "all" in drop:
        return
    unnamed = [run_id for run_id in lost if not any(run_id.startswith(d) for d in drop if d)]
    if unnamed:
        listed = ", ".join(run_id[:8] for run_id in unnamed[:12]) + (", ..." if len(unnamed) > 12 else "")
        raise UserError(f"{published.parent} counts {len(before)} runs and this store {len(done)}: rebuilding it "
                        f"here would drop {len(unnamed)} run(s) not named by --drop ({listed}), so nothing was "
                        "written. Publish from the study's store (make results reads mlruns/study/mlflow.db, which "
                        "make study restores from results/store/ on a new machine), or name what may go: "
                        "--drop ID,ID,... (the first 8 characters will do), or --drop all.")


@dataclass
class Report:
    """What the writers of a report read: the tables' and figures' spec (tables.yaml), every run
    and the counted ones, the tuning trials (trials.load_trials), each table and its gaps, each
    cell's settings and runs, the claims' verdicts and those left out, what built the report, and
    the figures drawn (``made``) or left out (``absent``)."""
    spec: dict
    experiment: str
    source: str
    runs: pd.DataFrame
    done: pd.DataFrame
    trials: pd.DataFrame
    tables: dict = field(default_factory=dict)
    missing: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    cells: dict = field(default_factory=dict)
    unclaimed: list = field(default_factory=list)
    checked: list = field(default_factory=list)
    built: dict = field(default_factory=dict)
    made: dict = field(default_factory=dict)
    absent: dict = field(default_factory=dict)
    kept: list = field(default_factory=list)

    @property
    def not_counted(self) -> int:
        return int((self.runs["status"] != "FINISHED").sum()) if len(self.runs) else 0


def query(client: MlflowClient, experiment: str, source: str = "") -> Report:
    """The report's numbers, from the store: tables, cells and claims (nothing is written)."""
    spec = yaml.safe_load(TABLES_FILE.read_text())
    runs, found = load_runs(client, experiment), trials.load_trials(client, experiment)
    tuned_tables = [name for name, table_spec in spec["tables"].items() if "tuned_from" in table_spec]
    # A tuned table is left out until its tuning study has trials: shown with gaps, it would change
    # the report (and the published results/) of a study that has not tuned anything.
    spec["tables"] = {name: table_spec for name, table_spec in spec["tables"].items()
                      if "tuned_from" not in table_spec or (found["experiment"] == table_spec["tuned_from"]).any()}
    report = Report(spec, experiment, source, runs, finished_groups(runs), found, built=builder(client, experiment))
    tuned = trials.tuned_by(found)
    for name, table_spec in spec["tables"].items():
        report.tables[name], report.missing[name] = build_table(report.done, table_spec, name, tuned)
        for value in table_spec["values"]:
            key, own = (name, cell_key(value)), {**table_spec["fixed"], **row_settings(table_spec, value)}
            report.settings[key] = tuned_cell(name, table_spec, own, tuned)  # None: a tuned arm without a winner yet
            report.cells[key] = report.done.iloc[:0] if report.settings[key] is None else pick_group(
                report.done, report.settings[key])
    # The claims on a tuned table join the claims, and Holm's family, once the table has a finished
    # run: until then they would only lower every other claim's Holm level.
    report.unclaimed = [name for name in tuned_tables if name not in spec["tables"]
                        or all(report.cells[(name, cell_key(v))].empty for v in spec["tables"][name]["values"])]
    report.checked = claims.checked_claims(
        lambda table, value: report.cells[(table, cell_key(value))],
        {name: table_spec["experiment"] for name, table_spec in spec["tables"].items()},
        lambda table, value: report.settings[(table, cell_key(value))], left_out=report.unclaimed)
    return report


def compose_images(client: MlflowClient, name: str, fig_spec: dict, panels: dict[str, pd.DataFrame], tmp: Path,
                   before: pd.DataFrame, folder: Path) -> tuple[Figure | None, dict, list, bool]:
    """(the image figure ``name``, the panels it shows, their runs as rows of SOURCES, whether
    the last build's file in ``folder`` is kept instead): kept where this store lacks some of the
    panels' images and that build drew the figure from the same runs (``before``: its SOURCES)."""
    runs = [(name, label, str(int(group["seed"].iloc[0])), group["run_id"].iloc[0]) for label, group in panels.items()]
    images = panel_images(client, fig_spec["artifact"], panels, tmp)
    drawn_before = sorted(map(tuple, before[before["figure"] == name].to_numpy()))
    if len(images) < len(panels) and drawn_before == sorted(runs) and (folder / f"{name}.png").is_file():
        return None, panels, runs, True
    panels = {label: panels[label] for label in images}
    absent = [label for label in fig_spec["panels"] if label not in images]
    shown = {f"{label} (seed {int(panels[label]['seed'].iloc[0])})": image for label, image in images.items()}
    fig = figures.compose_artifacts(fig_spec["title"], shown, absent) if images else None
    return fig, panels, [row for row in runs if row[1] in images], False


def draw_figures(client: MlflowClient, report: Report, folder: Path) -> None:
    """The report's figures (tables.yaml), each from its cells' runs, into ``folder``, and the
    runs their image panels show into ``folder``/sources.csv (SOURCES)."""
    before = (pd.read_csv(folder / SOURCES, dtype=str, keep_default_na=False) if (folder / SOURCES).is_file()
              else pd.DataFrame(columns=SOURCE_COLUMNS))
    sources = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig_spec in report.spec["figures"].items():
            panels = {label: report.cells[(table, cell_key(value))]
                      for label, (table, value) in fig_spec["panels"].items()}
            panels = {label: group for label, group in panels.items() if not group.empty}
            if fig_spec["kind"] == "curves":
                fig, runs, kept = compose_curves(client, fig_spec, panels) if panels else None, [], False
            else:
                fig, panels, runs, kept = compose_images(client, name, fig_spec, panels, Path(tmp), before, folder)
            report.absent[name] = [label for label in fig_spec["panels"] if label not in panels]
            if fig is not None or kept:
                report.made[name] = folder / f"{name}.png"
                sources += runs
            if fig is not None:
                fig.savefig(report.made[name])
            if kept:
                report.kept.append(name)
    pd.DataFrame(sources, columns=SOURCE_COLUMNS).to_csv(folder / SOURCES, index=False)
    curves = {study: trials.equal_budget_curve(group) for study, group in trials.by_study(report.trials)}
    curves = {study: points for study, points in curves.items() if points}
    if curves:
        report.made[TUNING_CURVES] = folder / f"{TUNING_CURVES}.png"
        tunings = report.trials.loc[report.trials["study"].isin(curves), "experiment"].unique()
        title = tunings[0] if len(tunings) == 1 else None  # one tuning experiment: the legend's title
        labels = {study.removeprefix(f"{title}/") if title else study: points for study, points in curves.items()}
        figures.tuning_curves(labels, f"the MLflow experiment {trials.trials_experiment(report.experiment)}: trials in "
                              "the order they ended | a dot: a trial that lowered the best | pruned trials add "
                              "epochs but no dot", legend_title=title).savefig(report.made[TUNING_CURVES])


def build_report(client: MlflowClient, experiment: str, out: Path, source: str = "", drop: set[str] = frozenset()
                 ) -> dict:
    """Write tables (Markdown and CSV), claims, runs.csv, figures (PNG), report.md and summary.md
    into ``out``; returns {"tables": {name: DataFrame}, "missing": {name: [command]},
    "figures": {name: path}, "claims": [(spec, Verdict)]}. Writes nothing where ``out`` holds a
    report of more runs (``refuse_fewer``)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    report = query(client, experiment, source)
    refuse_fewer(report.done, out / "runs.csv", drop)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for name, table_spec in report.spec["tables"].items():
        table, label = report.tables[name], row_label(table_spec)
        table.to_csv(out / f"{name}.csv", index=False)
        tuned = f"\n\n{tuned_markdown(table, table_spec)}" if "tuned_from" in table_spec else ""
        (out / f"{name}.md").write_text(table_markdown(table, label) + tuned + "\n\n"
                                        + evaluation_markdown(table, label) + "\n")
    if not report.trials.empty:
        trials.trial_records(report.trials).to_csv(out / "tuning_trials.csv", index=False)
    claims.table(report.checked).to_csv(out / "claims.csv", index=False)
    (out / "claims.md").write_text(claims.markdown(report.checked))
    draw_figures(client, report, out / "figures")
    runs_table(report.done).to_csv(out / "runs.csv", index=False)
    (out / "report.md").write_text(report_markdown(report))
    (out / "summary.md").write_text(summary_markdown(report))
    return {"tables": report.tables, "missing": report.missing, "figures": report.made, "claims": report.checked}


def runs_table(done: pd.DataFrame) -> pd.DataFrame:
    """One row per counted run: its id, seed, provenance, every param and every test metric."""
    params = sorted(c for c in done.columns if c not in RECORD and not c.startswith("metrics.") and c != "seed")
    tests = sorted(c for c in done.columns if c.startswith("metrics.test/")) + [FLUCTUATION]
    table = done.reindex(columns=["run_id", "seed", "commit", "host", "torch_version", "cpu_count", "torch_threads",
                                  "command", "start_time", "end_time", *params, "classes_drawn", *tests])
    return table.rename(columns={c: c[len("metrics."):] for c in tests}).sort_values(["start_time", "run_id"])


def builder(client: MlflowClient, experiment: str) -> dict:
    """What builds this report: the project's commit, the versions of Python and the libraries,
    and the judges (judge.py) whose verdicts the runs carry: [{dataset, run_id, accuracy, end_time}]
    in the order they were trained, per dataset."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=PROJECT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    judges = [{"dataset": run.data.tags.get("judge_dataset", "?"), "run_id": run.info.run_id,
               "accuracy": run.data.metrics.get("test/accuracy"), "end_time": run.info.end_time}
              for run in store.every_run(client, judge.experiment_name(experiment), "attributes.status = 'FINISHED'")]
    # changed or new files outside results/, whose files (and the snapshot of the store that a
    # publication builds from, results/store/.snapshot-*) are what the report writes, not its code
    dirty = bool(git("status", "--porcelain", "--", ".", ":(exclude)results"))
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown", "dirty": dirty,
            "versions": {"Python": platform.python_version(), "torch": version("torch"),
                         "Lightning": version("pytorch-lightning"), "MLflow": version("mlflow")},
            "judges": sorted(judges, key=lambda found: (found["dataset"], found["end_time"]))}


def judged_by(done: pd.DataFrame, judges: list[dict]) -> pd.Series:
    """The judge run behind each counted run's judged metrics (None for a run without them): its
    tag ``judge_run``, else (a run from before that tag) the judge of its dataset that finished
    last before the run ended, since a run's end-of-run evaluation loads the latest judge, or
    trains one where there is none (or its weights are gone)."""
    def judge_of(run: pd.Series) -> str | None:
        if pd.isna(run.get("metrics.test/judged_accuracy")):
            return None
        if isinstance(run.get("judge_run"), str):
            return run["judge_run"]
        before = [found for found in judges if judge.data_name(found["dataset"]) == run["data.name"]
                  and found["end_time"] <= run["end_time"]]
        return max(before, key=lambda found: found["end_time"])["run_id"] if before else None

    return done.apply(judge_of, axis=1) if len(done) else pd.Series(dtype=object)


def built_by(built: dict, done: pd.DataFrame) -> str:
    """The sentences that name what built the report (``builder``) and which judge judged how
    many of the counted runs (``judged_by``)."""
    versions = ", ".join(f"{name} {v}" for name, v in built["versions"].items())
    judged = judged_by(done, built["judges"]).value_counts()
    judges = "; ".join(f"{found['dataset']}: run `{found['run_id']}`"
                       + (f", test accuracy {found['accuracy']:.2%}" if found["accuracy"] is not None else "")
                       + f", {judged.get(found['run_id'], 0)} counted run(s) judged" for found in built["judges"])
    in_use = pd.Series([found["dataset"] for found in built["judges"] if judged.get(found["run_id"], 0)], dtype=object)
    several = sorted(in_use[in_use.duplicated()].unique())  # datasets whose runs more than one judge judged
    return (f"This report was built by the code at commit `{built['commit']}`"
            f"{' with uncommitted changes' if built['dirty'] else ''}, with {versions}. "
            f"The judges behind the judged metrics (judge.py): {judges or 'none in this store'}."
            + (f" The runs of {', '.join(several)} were judged by more than one judge: each judge is trained "
               "alike (the same images, seed and recipe), once per store, and again where a store restored "
               "from its published records has no judge weights (they are not published), so the judges "
               "of different machines may differ slightly." if several else ""))


def shown_store(uri: str) -> str:
    """The store as the report names it: a SQLite store inside the project by its relative path,
    one elsewhere by its file name (no path of the machine that built it), a server redacted."""
    db = store.sqlite_path(uri)
    if db is None:
        return redact(uri)
    return str(db.relative_to(PROJECT)) if db.is_relative_to(PROJECT) else db.name


def provenance(done: pd.DataFrame) -> str:
    """Where the counted runs come from: commits, machines, torch, and their compute time."""
    if done.empty:
        return ""

    def listed(column: str) -> str:
        values = sorted({str(v) for v in done.get(column, pd.Series(dtype=object)).dropna()})
        return ", ".join(f"`{v}`" for v in values) or "not recorded"

    if "end_time" in done:
        hours = (done["end_time"] - done["start_time"]).clip(lower=0).sum() / 3.6e6
        span = (done["end_time"].max() - done["start_time"].min()) / 3.6e6
    else:
        hours = span = math.nan
    commands = done.get("command", pd.Series(dtype=object)).dropna().value_counts().sort_index()
    launched = "; ".join(f"`{command}` ({count} run{'s' * (count != 1)})" for command, count in commands.items())
    return (f"Provenance of the counted runs: code at commit(s) {listed('commit')}; host(s) {listed('host')} with "
            f"{listed('cpu_count')} CPU core(s), {listed('torch_threads')} torch thread(s) per job, torch "
            f"{listed('torch_version')}; {hours:.1f} hours of training and evaluation in all (the sum of the runs' "
            f"wall times, start to end: a run resumed after a stop counts its pause too), {span:.1f} hours from "
            "the first run's start to the last run's end. The commands that trained them (each run's `command` "
            f"tag): {launched or 'not recorded'}. `make study` runs each part in turn (`python -m vae_sweeps "
            "experiment=<part>`: the axes and seeds of conf/experiment/<part>.yaml); this report comes from "
            "`make report` (`make results` for results/). "
            "`runs.csv` lists every counted run with its params and test metrics.")


def report_markdown(report: Report) -> str:
    """report.md: provenance, how to read it, the claims, every table with its claims and gaps,
    every figure."""
    spec, tables, missing, done, checked = report.spec, report.tables, report.missing, report.done, report.checked
    made, absent, experiment, source, built = report.made, report.absent, report.experiment, report.source, report.built
    n_other = report.not_counted
    lines = [
        "# The VAE study, rebuilt from tracked runs", "",
        f"Built {time.strftime('%Y-%m-%d %H:%M')} from {len(done)} FINISHED run(s) of the MLflow experiment "
        f"`{experiment}`{f' at `{source}`' if source else ''}; {n_other} run(s) that did not finish "
        "(FAILED, KILLED, RUNNING) are not counted. The study itself, its published numbers and what is ours: "
        "docs/study.md.", "", provenance(done), "", *([built_by(built, done), ""] if built else []),
        "How to read the tables. *Recon*, *KL* and *Total* (= c * Recon + KL) are ours, per test image, "
        "as mean ± std over *n* seeds after *epochs* epochs (30: the study gives no epoch count). Where a table "
        "has rows with c ≠ 1, their Totals are on different scales, and *Recon + KL* (the negative ELBO at c = 1) "
        "is shown beside them. *train* columns are the training loss of the "
        "last epoch (mean over seeds). *study* columns are the published numbers (docs/study.md), "
        "most likely training figures of a single run, while ours are test figures. *Δ Total* = our test Total − "
        "the study's Total. *log p(x)* and *ELBO* are under the Bernoulli likelihood with c = 1 for every run, "
        "whatever loss and c it trained with, so they compare across rows; on grey-level pixels the Bernoulli is "
        "not a normalised density, so these numbers are not comparable with results on binarised MNIST in the "
        "literature. "
        f"A {DASH} is a cell with no finished run; the commands under each table would fill it. "
        "Where several configurations match a cell (a quick and a full budget, say), the one with the most "
        f"epochs is shown. A {FLAG} after *n* marks runs with settings other than the defaults (fewer epochs "
        "than the study's 30, say), listed under the table. "
        "Each table's CSV (beside this file) lists the MLflow run ids behind every row.", "",
    ]
    if checked:
        lines += ["## The study's claims, checked", "",
                  "Each claim of the study (docs/study.md) and its companion write-ups, tested on the tables' runs "
                  "as defined in `experiments/claims.yaml`: differences between rows use every seed, as a mean "
                  "difference with a 95% interval by Welch's t, and the verdict follows from where the interval lies "
                  "(`claims.csv` holds the same).", "", claims.markdown(checked)]
    for name, table_spec in spec["tables"].items():
        table, label = tables[name], row_label(table_spec)
        samples = sorted({int(k) for k in table["iw_samples"].dropna()})
        tuning = f", after its tuning study `{tuning_command(table_spec)}`" if "tuned_from" in table_spec else ""
        lines += [f"## {table_spec['title']}", "", f"Fixed: {table_spec['setting']}. "
                  f"Filled by `python -m vae_sweeps experiment={table_spec['experiment']}`{tuning}.", "",
                  table_markdown(table, label), "",
                  *([tuned_markdown(table, table_spec), ""] if tuning else []),
                  "The end-of-run evaluation of the same runs (ELBO and log p(x) by Monte Carlo; BCE, L2 and L1 "
                  "of the posterior-mean reconstructions; sharpness relative to the originals; "
                  f"K = {', '.join(map(str, samples)) or DASH} importance samples per image):", "",
                  evaluation_markdown(table, label), ""]
        tested = [claims.headline(spec, v) for spec, v in checked if name in claims.tables_of(spec)]
        if tested:
            lines += ["The claims tested on this table (their numbers are under \"The study's claims, checked\"):", "",
                      *[f"- {line}" for line in tested], ""]
        if name in report.unclaimed:
            lines += ["The claims on this table join the claims checked (and Holm's family) once it has a finished "
                      "run.", ""]
        if missing[name]:
            lines += ["Missing cells; to fill them:", "", *[f"    {command}" for command in missing[name]], ""]
    if not report.trials.empty:
        lines += tuning_markdown(report)
    lines += ["## Figures", ""]
    for name, fig_spec in spec["figures"].items():
        lines += [f"### {fig_spec['title']}", "", fig_spec["text"], ""]
        if name in made:
            lines += [f"![{fig_spec['title']}](figures/{made[name].name})", ""]
        if name in report.kept:
            lines += [f"As the last build of this report drew it: this store does not hold its runs' images "
                      f"(figures/{SOURCES} names them).", ""]
        if absent[name]:
            what = "Not drawn" if name not in made else "Left out"
            lines += [f"{what}: no finished run (with this figure) for {', '.join(absent[name])}; "
                      "see the tables' missing cells.", ""]
    return "\n".join(lines)


def tuning_markdown(report: Report) -> list[str]:
    """report.md's section on the tuning studies: a row per study, and their equal-budget curves."""
    lines = ["## Tuning studies", "",
             "The trials of the tuning studies (the MLflow experiment "
             f"`{trials.trials_experiment(report.experiment)}`, vae_sweeps/trials.py), one study per arm of a tuned "
             "table, in the order the studies ran (their first trial's end). Each trial trains at a seed of its own "
             "and is judged by its validation loss at its last epoch; "
             "the winner of a study is its COMPLETE trial with the lowest, the lower trial number on a tie (a PRUNED "
             "trial, stopped early, never wins). The tuned tables retrain each winner afresh at their own seeds, and "
             "only they see the test set. *Epochs spent* counts every trial's training epochs, pruned ones included: "
             "the studies' budget. `tuning_trials.csv` lists every trial.", "",
             studies_markdown(trials.studies(report.trials)), ""]
    if TUNING_CURVES in report.made:
        title = "Equal-budget tuning curves (Dodge et al. 2019)"
        lines += ["The best validation loss each study had found against the training epochs it had spent, trial by "
                  "trial in the order the trials ended, each line running on to every epoch its study spent: a "
                  "study whose curve is lower at the same budget tuned better, and a long flat end says that "
                  "more of the same budget found nothing better.", "",
                  f"![{title}](figures/{report.made[TUNING_CURVES].name})", ""]
    return lines


def summary_markdown(report: Report) -> str:
    """The report in brief: its provenance, each claim's verdict, each table's test numbers."""
    spec, tables, done, checked = report.spec, report.tables, report.done, report.checked
    lines = [provenance(done) or "No finished runs yet.", "",
             "Test set, nats per image, mean ± std over *n* seeds after *epochs* epochs (30: the study gives no "
             "epoch count); *study Total* is the published figure, most likely a training figure of one run. Where "
             "c ≠ 1, Total = c * Recon + KL is on the row's own scale and *Recon + KL* compares across rows; "
             "log p(x) is under the Bernoulli likelihood with c = 1 for every run (on grey-level pixels not a "
             "normalised density: not comparable with binarised-MNIST results). Fashion-MNIST numbers at n < 3 "
             "are descriptive only. The claims' tests (95% intervals; Welch's t for a difference between rows), "
             "their numbers, the seeds that would decide an undecided one, and every table's evaluation are in "
             "`report.md`; the study and what is ours in docs/study.md.", "",
             claims.family_note(checked), "",
             "| claim | verdict | Holm-adjusted | why |", "|---|---|---|---|",
             *[f"| {s['id']}. {s['claim']} | **{v.verdict}** | {v.adjusted} | {v.why} |" for s, v in checked], ""]
    for name, table_spec in spec["tables"].items():
        lines += [f"**{table_spec['title']}** ({table_spec['setting']})", "",
                  brief_markdown(tables[name], row_label(table_spec)), ""]
    return "\n".join(lines)


def readme_parts(readme: Path) -> tuple[str, str]:
    """The text of ``readme`` before its results block (README_BEGIN) and from its end on."""
    text = readme.read_text() if readme.is_file() else ""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise UserError(f"{readme} has no block to write the results into: add the two lines\n"
                        f"{README_BEGIN}\n{README_END}\nwhere they belong")
    return text[:begin], text[end:]


def write_into_readme(readme: Path, summary: str) -> None:
    """Replace the results block of ``readme`` with ``summary``; the rest stays as it is."""
    before, after = readme_parts(readme)
    readme.write_text(f"{before}{README_BEGIN}\n{summary.strip()}\n{after}")


COMPARED = ("*.csv", "*.md")  # what --check compares: every table, the claims and runs.csv, the summary
NOT_COMPARED = ("report.md",)  # it names when and by which commit it was built


def differences(built: Path, published: Path) -> list[str]:
    """The files of a rebuilt report that differ from (or are missing in) the published one."""
    names = sorted({p.name for pattern in COMPARED for folder in (built, published) for p in folder.glob(pattern)}
                   - set(NOT_COMPARED))
    return [name for name in names if not (built / name).is_file() or not (published / name).is_file()
            or (built / name).read_bytes() != (published / name).read_bytes()]


def main(argv: list[str] | None = None) -> None:
    defaults = OmegaConf.load(identity.CONF_DIR / "config.yaml").tracking
    parser = argparse.ArgumentParser(prog="python -m vae_sweeps.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder (default: reports)")
    parser.add_argument("--tracking-uri", default=store.resolve_uri(defaults.uri),
                        help=f"MLflow store (default: $MLFLOW_TRACKING_URI, else {defaults.uri})")
    parser.add_argument("--experiment", default=defaults.experiment, help="MLflow experiment name")
    parser.add_argument("--readme", type=Path, help="also write summary.md into this file's results block")
    parser.add_argument("--drop", default="", metavar="IDS",
                        help="run ids (or their first characters), comma-separated, or 'all': the runs of the report "
                             "already in --out that this store lacks and that may be dropped")
    parser.add_argument("--check", type=Path, metavar="DIR",
                        help="build into a temporary folder and compare its tables, claims, CSVs and summary with "
                             "DIR's, byte for byte (exit 1 if any differs); writes nothing")
    parser.add_argument("--publish-store", type=Path, metavar="DB",
                        help="build from a copy of the (SQLite) store taken now, and on success publish that copy's "
                             "run records at DB: the records behind exactly this report, while the study trains on")
    parser.add_argument("--config-dir", type=config_folder, metavar="DIR",
                        help="a folder of your own options (DIR/<axis>/<name>.yaml), as a job's --config-dir: "
                             "needed for runs of your own model, dataset, prior or loss")
    args = parser.parse_args(argv)
    try:
        with identity.project_config(args.config_dir):
            publish(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


def publish(args: argparse.Namespace) -> None:
    """The command's work (main): check a published report, or build one (and its README block)."""
    if args.readme:
        readme_parts(args.readme)  # no block to write into: say so before the report is built
    store.quiet_downloads()
    uri = store.absolute_uri(args.tracking_uri)
    store.repair_moved_store(uri)  # a moved SQLite store: find its figures beside it
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build_report(MlflowClient(tracking_uri=uri), args.experiment, Path(tmp), shown_store(uri))
            differ = differences(Path(tmp), args.check)
        if differ:
            print(f"{args.check} differs from the report rebuilt from {shown_store(uri)} in: {', '.join(differ)}")
            raise SystemExit(1)
        print(f"{args.check}: every table, claim, CSV and the summary rebuilt from {shown_store(uri)}, byte for byte.")
        return
    if args.publish_store:  # the report of a copy of the store, which it publishes: the working store is not opened
        result = build_and_publish(uri, args)
    else:
        result = build_report(MlflowClient(tracking_uri=uri), args.experiment, args.out, shown_store(uri),
                              set(args.drop.split(",")))
    gaps = sum(len(m) for m in result["missing"].values())
    print(f"Wrote {args.out / 'report.md'}: {len(result['tables'])} tables ({gaps} missing cells), "
          f"{len(result['figures'])} figures.")
    if args.readme:
        write_into_readme(args.readme, (args.out / "summary.md").read_text())
        print(f"Wrote its summary into {args.readme}.")


def build_and_publish(uri: str, args: argparse.Namespace) -> dict:
    """The report of a copy of the SQLite store at ``uri`` taken now (study_store.publish: its
    live runs KILLED), and that copy published at ``args.publish_store`` once the report is
    written: a run that ends while the report is built is in neither. A refused report publishes
    nothing."""
    working = store.sqlite_path(uri)
    if working is None:
        raise UserError(f"--publish-store publishes a SQLite store's records; {redact(uri)} is not one "
                        "(sqlite:///<path>/mlflow.db).")
    published = args.publish_store.resolve()
    published.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=published.parent, prefix=".snapshot-") as tmp:  # the same file system
        snapshot = Path(tmp) / published.name
        records = study_store.publish(working, snapshot)  # its artifact locations stay the working store's
        client = MlflowClient(tracking_uri=f"sqlite:///{snapshot}")
        result = build_report(client, args.experiment, args.out, shown_store(f"sqlite:///{published}"),
                              set(args.drop.split(",")))
        os.replace(snapshot, published)
    print(f"Published the {records} run record(s) behind {args.out / 'report.md'} to {args.publish_store}.")
    return result


if __name__ == "__main__":
    main()
