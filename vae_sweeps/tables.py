"""The study's tables as queries over the tracked runs (``make report`` writes them).

Every run becomes one flat record of its params and last metrics (``load_runs``). Only
FINISHED runs count. Runs whose result settings differ only in seed form a group
(identity.group_key), and where a seed ran twice the latest run is kept. Each table cell is the
group that matches the table's fixed settings and the row's value (``pick_group``); when several
match, one at the defaults in its other settings wins over one with other settings (the runs of a
tuned table in Table 1's cells, say), then (a quick and a full budget, say) the one with the most
epochs, then the most seeds, then the newest. A cell reports mean +- std over the group's seeds.
A run logged before a setting existed counts as having that setting's current default. The
tables are defined in ``experiments/tables.yaml``, which also says which jobs fill them:
``part_jobs`` reads it for the study sweeper, so each part's grid and its tables have one source.
A tuned table (``tuned_from``) completes its cells with its arms' winning trials (trials.py).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import yaml
from mlflow import MlflowClient

from vae_sweeps import identity, metrics, store
from vae_sweeps.errors import ConfigError
from vae_sweeps.identity import PROJECT

TABLES_FILE = PROJECT / "experiments" / "tables.yaml"
TAGGED = ("sweep_id", "classes_drawn", "judge_run", "host", "torch_version", "cpu_count", "torch_threads", "command")
# per-run columns that are not params: the run, its group (identity.group_key) and provenance tags
RECORD = ("run_id", "status", "start_time", "end_time", "sweep_id", "group", "classes_drawn", "judge_run", "commit",
          "host", "torch_version", "cpu_count", "torch_threads", "command")
STATS = (("recon", "recon"), ("kl", "kl"), ("total", "loss"))  # (column name, metric name)
# Recon + KL of each run: its Total where c = 1, and the c = 1 negative ELBO (one scale) where c != 1
PLAIN_TOTAL = ("recon_plus_kl", "Recon + KL")
FLUCTUATION = "metrics.val/loss_fluctuation"  # a run's curve's fluctuation (``fluctuation``), from its history
DASH = "—"
FLAG = "†"  # after n: the cell's runs have settings other than the defaults, listed under the table


def columns() -> list[str]:
    """A table's columns after its row label (and a CSV's): the Total's parts at test and train,
    the study's, and a mean and std per metric of the end-of-run evaluation that has a header
    in the registry (metrics.py, read at each call), in its order."""
    return ["n", "epochs", "seeds",
            *[f"test_{name}_{s}" for name, _ in STATS for s in ("mean", "std")],
            *[f"test_{PLAIN_TOTAL[0]}_{s}" for s in ("mean", "std")],
            *[f"train_{name}" for name, _ in STATS],
            "study_recon", "study_kl", "study_total", "total_diff",
            *[f"test_{m.name}_{s}" for m in metrics.shown() for s in ("mean", "std")],
            "iw_samples", "knn_k", "run_ids", "non_default"]


# ---------------------------------------------------------------------------- runs as records


def _numbers(column: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column


def fluctuation(values: list[float]) -> float:
    """How much a loss curve fluctuates: the standard deviation of its epoch-to-epoch changes
    over the last half of training (``values``, one per epoch in order); NaN for fewer than
    three epochs in that half."""
    changes = np.diff(np.asarray(values[len(values) // 2:], dtype=float))
    return float(changes.std(ddof=1)) if len(changes) >= 2 else math.nan


def curve(client: MlflowClient, run_id: str, metric: str) -> list[float]:
    """A run's per-epoch values of ``metric``, in the order of the epochs."""
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]


def load_runs(client: MlflowClient, experiment: str) -> pd.DataFrame:
    """One row per run of ``experiment``: RECORD columns, params (numbers parsed), metrics.<key>,
    and for each FINISHED run ``metrics.val/loss_fluctuation``, from its history (``fluctuation``)."""
    records = [{"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time,
                "end_time": run.info.end_time, "group": identity.group_key(run.data.params),
                "commit": run.data.tags.get("mlflow.source.git.commit"),
                **{key: run.data.tags.get(key) for key in RECORD if key in TAGGED},
                **identity.completed(run.data.params),  # a run made before a setting existed ran with its default
                **{f"metrics.{k}": v for k, v in run.data.metrics.items()},
                **({FLUCTUATION: fluctuation(curve(client, run.info.run_id, "val/loss"))}
                   if run.info.status == "FINISHED" else {})}
               for run in store.every_run(client, experiment)]
    runs = pd.DataFrame.from_records(records, columns=list(RECORD) if not records else None)
    # milliseconds as integers, also where a live run has no end yet (not NaN's floats: the report of
    # a working store and of its published copy, whose live runs have ended, write the same CSVs)
    runs[["start_time", "end_time"]] = runs[["start_time", "end_time"]].astype("Int64")
    for column in runs.columns:
        if column not in RECORD and not column.startswith("metrics."):
            runs[column] = _numbers(runs[column])
    return runs


def finished_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """The FINISHED runs of each ``group`` (identity.group_key: one configuration over its
    seeds), the latest run kept where a group's seed ran more than once."""
    done = runs[runs["status"] == "FINISHED"].copy()
    if "seed" not in done:
        done["seed"] = 0
    return done.sort_values("start_time").drop_duplicates(["group", "seed"], keep="last")


def pick_group(done: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """The runs of the best group matching ``settings`` (empty if none): a group at the defaults
    besides ``settings`` (``non_default``) before one with other settings (a tuned table's runs
    in an untuned table's cell, say), then the most epochs, the most seeds, the newest."""
    mask = [identity.matches(run, settings) for run in done.reindex(columns=list(settings)).to_dict("records")]
    candidates = done[pd.Series(mask, index=done.index, dtype=bool)]
    if candidates.empty:
        return candidates
    epochs = candidates.get("trainer.max_epochs", pd.Series(0, index=candidates.index))
    ranking = (candidates.assign(_epochs=epochs).groupby("group")
               .agg(epochs=("_epochs", "max"), n=("run_id", "size"), newest=("start_time", "max")))
    ranking["plain"] = [non_default(candidates[candidates["group"] == group], settings) == ""
                        for group in ranking.index]
    ranking = ranking.sort_values(["plain", "epochs", "n", "newest"])
    return candidates[candidates["group"] == ranking.index[-1]].sort_values("seed")


def summarise(group: pd.DataFrame) -> dict:
    """A table row's numbers: test mean and std over seeds, train at the last epoch, run ids."""
    nothing = pd.Series([np.nan])
    row = {"n": len(group), "epochs": group.get("trainer.max_epochs", nothing).max(),
           "seeds": " ".join(str(int(s)) for s in group["seed"]),
           "iw_samples": group.get("eval.iw_samples", nothing).max(), "knn_k": group.get("eval.knn_k", nothing).max(),
           "run_ids": " ".join(group["run_id"])}
    nothing = pd.Series(dtype=float)
    for name, metric in [*STATS, *[(m.name, m.name) for m in metrics.shown()]]:
        test = group.get(f"metrics.test/{metric}", nothing)
        row[f"test_{name}_mean"] = test.mean()
        row[f"test_{name}_std"] = test.std(ddof=1)  # NaN for one seed
    plain = group.get("metrics.test/recon", nothing) + group.get("metrics.test/kl", nothing)
    row[f"test_{PLAIN_TOTAL[0]}_mean"], row[f"test_{PLAIN_TOTAL[0]}_std"] = plain.mean(), plain.std(ddof=1)
    for name, metric in STATS:
        row[f"train_{name}"] = group.get(f"metrics.train/{metric}", pd.Series(dtype=float)).mean()
    return row


def _shown(value) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    return f"{value:g}" if isinstance(value, float) else str(value)


def non_default(group: pd.DataFrame, own: dict) -> str:
    """The result settings of a cell's runs that differ from the defaults (those of the runs'
    model, loss, prior and data options), besides the cell's ``own`` settings and the seed,
    e.g. "trainer.max_epochs = 4 (default 30)"; "" where the runs used the defaults."""
    run = group.iloc[0].to_dict()  # a group's runs differ in their seed only
    defaults = identity.defaults(identity.choices(run))
    if not defaults:  # options that no longer exist: nothing to compare with
        return ""
    differ = []
    for key, value in sorted(run.items()):
        if (key in RECORD or key in own or key == "seed" or key.startswith("metrics.")
                or not identity.is_result_setting(key) or pd.isna(value)):
            continue
        if key not in defaults:
            differ.append(f"{key} = {_shown(value)} (not in the current config)")
        elif not identity.same_value(value, defaults[key]):
            differ.append(f"{key} = {_shown(value)} (default {defaults[key]})")
    return ", ".join(differ)


# ---------------------------------------------------------------------------- tables


def overrides(settings: dict) -> dict[str, str]:
    """Settings (MLflow param keys, as tables.yaml gives them) as Hydra overrides {key: value}: an
    axis's ``<axis>.name`` is the choice of its option (``model.name: cnn`` is ``model=cnn``),
    any other key a value (``model.latent_dim=2``), and None is no override (a param that the
    run lacks, as ``prior.kl`` under the standard prior)."""
    def key(name: str) -> str:
        return name.removesuffix(".name") if name.removesuffix(".name") in identity.AXES else name
    return {key(name): str(value) for name, value in settings.items() if value is not None}


def fill_command(settings: dict, seeds) -> str:
    """The sweep that would fill a cell (or add seeds to it): its settings as overrides, over ``seeds``."""
    choices = " ".join(f"{key}={value}" for key, value in overrides(settings).items())
    return f"python -m vae_sweeps -m {choices} seed={','.join(map(str, seeds))}"


def row_keys(spec: dict) -> list[str]:
    """The params that form a table's rows: one key, or several (``rows: [a, b]``)."""
    return spec["rows"] if isinstance(spec["rows"], list) else [spec["rows"]]


def row_label(spec: dict) -> str:
    return "/".join(row_keys(spec))


def row_settings(spec: dict, value) -> dict:
    values = value if isinstance(spec["rows"], list) else [value]
    return dict(zip(row_keys(spec), values))


def cell_settings(spec: dict, value) -> dict:
    """The settings of a table's cell: its row's value(s) and the table's fixed settings."""
    return {**row_settings(spec, value), **spec["fixed"]}


def tuned_cell(name: str, spec: dict, settings: dict, tuned) -> dict | None:
    """A cell's ``settings``, for a tuned table (one with ``tuned_from``: tables.yaml) completed
    with its arm's tuned settings: ``tuned(name, spec["tuned_from"], settings)`` (the searched
    settings of the arm's winning trial, trials.tuned_by), None while the arm has no winner."""
    if "tuned_from" not in spec:
        return settings
    if tuned is None:
        raise ConfigError(f"table {name} is tuned (tuned_from: {spec['tuned_from']}): its cells need the winners "
                          "of that tuning study, and no store was given to read them from.")
    found = tuned(name, spec["tuned_from"], settings)
    return None if found is None else {**settings, **found}


def tuning_command(spec: dict) -> str:
    """The command that runs a tuned table's tuning study."""
    return f"python -m vae_sweeps experiment={spec['tuned_from']}"


def part_jobs(part: str, spec: dict | None = None, tuned=None) -> list[dict]:
    """The settings of every job of the study part ``part`` (conf/experiment/<part>.yaml), in the
    order its sweep runs them. ``spec`` (by default experiments/tables.yaml) is the one place that
    says which jobs a part has: the cells of every table whose ``experiment`` is ``part``, over the
    table's seeds, and the cells of ``more_seeds`` over its seeds if its ``experiment`` is ``part``.
    A tuned table's cells are completed by ``tuned`` (``tuned_cell``; trials.tuned_from_store
    reads the study's store); ConfigError names an arm that has no winning trial yet.

    The order: table by table as listed, then ``more_seeds``; each of them seed by seed, all its
    cells (in the order of ``values`` or ``cells``) at one seed before any at the next, so that a
    table whose sweep stopped half-way has the same seeds in every row. A cell shared by two
    tables is listed twice; the sweeper runs the same configuration once (its first place)."""
    spec = spec or yaml.safe_load(TABLES_FILE.read_text())
    tables = spec["tables"]
    blocks = [(table["seeds"], [(name, value) for value in table["values"]])
              for name, table in tables.items() if table["experiment"] == part]
    more = spec.get("more_seeds")
    if more and more["experiment"] == part:
        blocks.append((more["seeds"], [(name, value) for name, value in more["cells"]]))

    def settings(name: str, value) -> dict:
        table = tables[name]
        cell = tuned_cell(name, table, cell_settings(table, value), tuned)
        if cell is None:
            arm = " ".join(f"{key}={v}" for key, v in row_settings(table, value).items())
            raise ConfigError(f"{name}'s arm {arm} has no COMPLETE trial of the tuning experiment "
                              f"{table['tuned_from']} in this store yet, so its tuned settings are unknown: run "
                              f"`{tuning_command(table)}` first.")
        return cell

    cells = {(name, cell_key(value)): settings(name, value) for _, listed in blocks for name, value in listed}
    return [{"seed": seed, **cells[(name, cell_key(value))]} for seeds, listed in blocks for seed in seeds
            for name, value in listed]


def cell_key(value):
    """A row value as a dict key (several-key rows are lists in the YAML)."""
    return tuple(value) if isinstance(value, list) else value


UNTUNED = ["untuned_total_mean", "untuned_total_std", "untuned_n"]  # a tuned table's untuned cell, beside it


def untuned(done: pd.DataFrame, own: dict) -> dict:
    """A tuned table's cell ``own`` untuned: the test Total (mean, std, n) of its runs at the
    defaults (Table 1's runs for Table 1, tuned), so that the report shows what tuning changed;
    NaN where no run of the cell is at the defaults."""
    group = pick_group(done, own)
    if group.empty or non_default(group, own):
        return dict.fromkeys(UNTUNED, np.nan)
    numbers = summarise(group)
    return dict(zip(UNTUNED, (numbers["test_total_mean"], numbers["test_total_std"], numbers["n"])))


def build_table(done: pd.DataFrame, spec: dict, name: str = "", tuned=None) -> tuple[pd.DataFrame, list[str]]:
    """(one row per value of the table's row axis, the commands that would fill its gaps). A
    tuned table's cells are completed by ``tuned`` (``tuned_cell``), and its column ``tuned``
    holds each row's tuned settings ("optim.lr = 0.003, data.batch_size = 64"); an arm that has
    no winning trial yet is a gap that its tuning study, then the table's part, fill."""
    rows, missing = [], []
    published = spec.get("published") or {}
    label = row_label(spec)
    for value in spec["values"]:
        own = cell_settings(spec, value)
        settings = tuned_cell(name, spec, own, tuned)
        group = pick_group(done, settings) if settings is not None else done.iloc[:0]
        row = {label: "/".join(str(v) for v in row_settings(spec, value).values() if v is not None)}
        if settings is not None and settings != own:
            row["tuned"] = ", ".join(f"{key} = {v}" for key, v in settings.items() if key not in own)
        if "tuned_from" in spec:
            row.update(untuned(done, own))
        if settings is None:  # tune, then fill the table
            missing += [c for c in (tuning_command(spec), f"python -m vae_sweeps experiment={spec['experiment']}")
                        if c not in missing]
        elif group.empty:
            missing.append(fill_command(settings, spec["seeds"]))
        else:
            row.update(summarise(group), non_default=non_default(group, settings))
        if cell_key(value) in published:
            row["study_recon"], row["study_kl"], row["study_total"] = published[cell_key(value)]
        rows.append(row)
    tuned_columns = ["tuned", *UNTUNED] if "tuned_from" in spec else []
    table = pd.DataFrame(rows).reindex(columns=[label, *columns(), *tuned_columns])
    for column in ("n", "epochs", "iw_samples", "knn_k", *(["untuned_n"] if tuned_columns else [])):
        table[column] = table[column].astype("Int64")
    table["total_diff"] = table["test_total_mean"] - table["study_total"]
    return table, missing


def _cell(value, digits: int = 2) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _mean_std(row: pd.Series, name: str, digits: int = 2, prefix: str = "test") -> str:
    mean, std = row[f"{prefix}_{name}_mean"], row[f"{prefix}_{name}_std"]
    if pd.isna(mean):
        return DASH
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not pd.isna(std) else f"{mean:.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def _flagged(row: pd.Series) -> bool:
    return isinstance(row.get("non_default"), str) and row["non_default"] != ""


def _n(row: pd.Series) -> str:
    """The n cell, flagged where the runs have settings other than the defaults."""
    return _cell(row["n"]) + (f" {FLAG}" if _flagged(row) else "")


def weighted(table: pd.DataFrame, axis: str) -> bool:
    """Whether some row of ``table`` has c != 1: its Total (c * Recon + KL) is then on another
    scale than the others', and Recon + KL is shown beside it."""
    c = table[axis] if axis == "loss.c" else pd.Series(dtype=float)
    return bool((pd.to_numeric(c, errors="coerce").fillna(1.0) != 1.0).any())


def _totals(table: pd.DataFrame, axis: str) -> tuple[list[str], list[str]]:
    """(headers, names) of the Total columns: Total, and where c != 1 Total named for what it
    is and Recon + KL beside it."""
    if weighted(table, axis):
        return ["Total (= c * Recon + KL)", PLAIN_TOTAL[1]], ["total", PLAIN_TOTAL[0]]
    return ["Total"], ["total"]


def table_markdown(table: pd.DataFrame, axis: str) -> str:
    """Our test Recon, KL and Total, and the study's numbers where it published some; under
    it, the settings other than the defaults of each flagged row."""
    study = ["study_recon", "study_kl", "study_total", "total_diff"] if table["study_total"].notna().any() else []
    total_headers, totals = _totals(table, axis)
    header = [axis, "Recon", "KL", *total_headers, "n", "epochs", "train Recon", "train KL", "train Total",
              *(["study Recon", "study KL", "study Total", "Δ Total"] if study else [])]
    rows = [[_cell(row[axis]), *(_mean_std(row, name) for name in ("recon", "kl", *totals)), _n(row),
             _cell(row["epochs"]), *(_cell(row[f"train_{name}"]) for name, _ in STATS), *(_cell(row[c]) for c in study)]
            for _, row in table.iterrows()]
    notes = [f"- {row[axis]}: {row['non_default']}" for _, row in table.iterrows() if _flagged(row)]
    if not notes:
        return _markdown(header, rows)
    return (_markdown(header, rows) + f"\n\n{FLAG} These cells' runs used settings other than the defaults "
            "(besides the table's own), so they are not directly comparable:\n\n" + "\n".join(notes))


def tuned_markdown(table: pd.DataFrame, spec: dict) -> str:
    """A tuned table's tuned settings, a line per row (its column ``tuned``, build_table)."""
    label = row_label(spec)
    lines = [f"- {row[label]}: {row['tuned'] if isinstance(row['tuned'], str) else 'no COMPLETE trial yet'}"
             f"{_against_untuned(row)}" for _, row in table.iterrows()]
    return (f"Each row's tuned settings: the searched settings of its arm's winning trial (the COMPLETE one with "
            f"the lowest validation loss) in the tuning experiment `{spec['tuned_from']}` (\"Tuning studies\" in "
            "report.md), and its test Total tuned against untuned (the same cell at the defaults, as the untuned "
            "table has it):\n\n" + "\n".join(lines))


def _against_untuned(row: pd.Series) -> str:
    """"; Total <tuned> tuned, <untuned> untuned" (each mean ± std and n), "" for a row with neither."""
    tuned = f"{_mean_std(row, 'total')} (n = {_cell(row['n'])})" if not pd.isna(row["test_total_mean"]) else DASH
    if pd.isna(row["untuned_total_mean"]):
        return "" if tuned == DASH else f"; Total {tuned} tuned, no untuned run"
    return f"; Total {tuned} tuned, {_mean_std(row, 'total', prefix='untuned')} (n = {row['untuned_n']}) untuned"


def studies_markdown(studies: pd.DataFrame) -> str:
    """The tuning studies (trials.studies), a row each: trials, epochs spent and the winner."""
    rows = [[row["study"], f"{row['trials']} ({row['complete']} / {row['pruned']})", str(row["epochs"]),
             _cell(row["best_value"]),
             DASH if pd.isna(row["best_trial"]) else f"trial {int(row['best_trial'])}: {row['best_settings']}"]
            for _, row in studies.iterrows()]
    return _markdown(["study", "trials (complete / pruned)", "epochs spent", "best validation loss", "winner"], rows)


def brief_markdown(table: pd.DataFrame, axis: str) -> str:
    """The table in brief (the README's results): test Recon, KL, Total and log p(x) with n, and
    the study's Total where it published one."""
    study = ["study_total", "total_diff"] if table["study_total"].notna().any() else []
    total_headers, totals = _totals(table, axis)
    header = [axis, "Recon", "KL", *total_headers, "log p(x), IW (Bernoulli, c = 1)", "n", "epochs",
              *(["study Total", "Δ Total"] if study else [])]
    rows = [[_cell(row[axis]), *(_mean_std(row, name) for name in ("recon", "kl", *totals, "log_px")), _n(row),
             _cell(row["epochs"]), *(_cell(row[c]) for c in study)] for _, row in table.iterrows()]
    return _markdown(header, rows)


def evaluation_markdown(table: pd.DataFrame, axis: str) -> str:
    """The end-of-run evaluation: the columns that have a value in some row; in a table with
    no evaluated run yet, the columns its runs would fill (some priors' own on a priors axis)."""
    shown = [m for m in metrics.shown() if table[f"test_{m.name}_mean"].notna().any()]
    if not shown:
        shown = [m for m in metrics.shown() if m.where.axis is None or m.where.axis in axis]
    rows = [[_cell(row[axis]), *(_mean_std(row, m.name, m.digits) for m in shown), _n(row)]
            for _, row in table.iterrows()]
    return _markdown([axis, *(m.header for m in shown), "n"], rows)
