"""``make report``: the study's tables and figures, rebuilt from the tracked runs.

Reads MLflow only; nothing is trained. Every run becomes one flat record of its params and
last metrics. Only FINISHED runs count. Runs whose result settings differ only in seed form a
group, and where a seed ran twice the latest run is kept. Each table cell is the group that
matches the table's fixed settings and the row's value; when several match (a quick and a full
budget, say) the one with the most epochs wins, then the most seeds, then the newest. A cell
reports mean +- std over the group's seeds. A run logged before a setting existed counts as
having that setting's current default. The tables and figures are defined in
``experiments/tables.yaml``.

    python -m vae_sweeps.report [--out reports] [--tracking-uri URI] [--experiment NAME]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.image import imread
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from vae_sweeps import figures, identity, tracking

PROJECT = Path(__file__).resolve().parents[1]
TABLES_FILE = PROJECT / "experiments" / "tables.yaml"
RECORD = ("run_id", "status", "start_time", "sweep_id", "group")  # per-run columns that are not params
STATS = (("recon", "recon"), ("kl", "kl"), ("total", "loss"))  # (column name, metric name)
# The end-of-run evaluation (evaluation.py): (metric test/<name>, column header)
EVALUATION = (("elbo", "ELBO"), ("log_px", "log p(x), IW"), ("recon_bce", "BCE"), ("recon_l2", "L2"),
              ("recon_l1", "L1"), ("sharpness", "sharpness"), ("active_units", "active units"),
              ("knn_accuracy", "k-NN acc."), ("kl_mc", "KL (MC)"), ("kl_tight_gap", "tight - MC"),
              ("kl_bound_gap", "bound - MC"))
COLUMNS = ["n", "epochs", "seeds",
           *[f"test_{name}_{s}" for name, _ in STATS for s in ("mean", "std")],
           *[f"train_{name}" for name, _ in STATS],
           "study_recon", "study_kl", "study_total", "total_diff",
           *[f"test_{name}_{s}" for name, _ in EVALUATION for s in ("mean", "std")],
           "iw_samples", "knn_k", "run_ids"]
DASH = "—"
TITLE_BAND = 64  # pixels above the panels of a composed figure: its title, then panel labels


# ---------------------------------------------------------------------------- runs as records


def _numbers(column: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column


def load_runs(client: MlflowClient, experiment: str) -> pd.DataFrame:
    """One row per run of ``experiment``: RECORD columns, params (numbers parsed), metrics.<key>."""
    records = [{"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time,
                "sweep_id": run.data.tags.get("sweep_id"), "group": identity.group_key(run.data.params),
                **identity.completed(run.data.params),  # a run made before a setting existed ran with its default
                **{f"metrics.{k}": v for k, v in run.data.metrics.items()}}
               for run in tracking.every_run(client, experiment)]
    runs = pd.DataFrame.from_records(records, columns=list(RECORD) if not records else None)
    for column in runs.columns:
        if column not in RECORD and not column.startswith("metrics."):
            runs[column] = _numbers(runs[column])
    return runs


def default_params() -> dict[str, str]:
    """The result settings of a run of the default config, as strings (as MLflow returns them)."""
    return identity.defaults()


def finished_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """The FINISHED runs of each ``group`` (identity.group_key: one configuration over its
    seeds), the latest run kept where a group's seed ran more than once."""
    done = runs[runs["status"] == "FINISHED"].copy()
    if "seed" not in done:
        done["seed"] = 0
    return done.sort_values("start_time").drop_duplicates(["group", "seed"], keep="last")


def _matches(runs: pd.DataFrame, key: str, value) -> pd.Series:
    """Runs whose param ``key`` is ``value`` (None: runs without that param)."""
    if key not in runs:
        return pd.Series(value is None, index=runs.index)
    column = runs[key]
    if value is None:
        return column.isna()
    if isinstance(value, (int, float)) and pd.api.types.is_numeric_dtype(column):
        return pd.Series(np.isclose(column.astype(float), float(value)), index=runs.index)
    return column.astype(str) == str(value)


def pick_group(done: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """The runs of the best group matching ``settings`` (empty if none)."""
    mask = pd.Series(True, index=done.index)
    for key, value in settings.items():
        mask &= _matches(done, key, value)
    candidates = done[mask]
    if candidates.empty:
        return candidates
    epochs = candidates.get("trainer.max_epochs", pd.Series(0, index=candidates.index))
    ranking = (candidates.assign(_epochs=epochs).groupby("group")
               .agg(epochs=("_epochs", "max"), n=("run_id", "size"), newest=("start_time", "max"))
               .sort_values(["epochs", "n", "newest"]))
    return candidates[candidates["group"] == ranking.index[-1]].sort_values("seed")


def summarise(group: pd.DataFrame) -> dict:
    """A table row's numbers: test mean and std over seeds, train at the last epoch, run ids."""
    nothing = pd.Series([np.nan])
    row = {"n": len(group), "epochs": group.get("trainer.max_epochs", nothing).max(),
           "seeds": " ".join(str(int(s)) for s in group["seed"]),
           "iw_samples": group.get("eval.iw_samples", nothing).max(), "knn_k": group.get("eval.knn_k", nothing).max(),
           "run_ids": " ".join(group["run_id"])}
    for name, metric in [*STATS, *[(name, name) for name, _ in EVALUATION]]:
        test = group.get(f"metrics.test/{metric}", pd.Series(dtype=float))
        row[f"test_{name}_mean"] = test.mean()
        row[f"test_{name}_std"] = test.std(ddof=1)  # NaN for one seed
    for name, metric in STATS:
        row[f"train_{name}"] = group.get(f"metrics.train/{metric}", pd.Series(dtype=float)).mean()
    return row


# ---------------------------------------------------------------------------- tables


def fill_command(settings: dict) -> str:
    """The sweep that would fill a cell: its settings as overrides, over three seeds."""
    groups = {"model.name": "model", "loss.name": "loss", "data.name": "data", "prior.name": "prior"}
    overrides = [f"{groups.get(k, k)}={v}" for k, v in settings.items() if v is not None]
    return f"python -m vae_sweeps -m {' '.join(overrides)} seed=0,1,2"


def row_keys(spec: dict) -> list[str]:
    """The params that form a table's rows: one key, or several (``rows: [a, b]``)."""
    return spec["rows"] if isinstance(spec["rows"], list) else [spec["rows"]]


def row_label(spec: dict) -> str:
    return "/".join(row_keys(spec))


def row_settings(spec: dict, value) -> dict:
    values = value if isinstance(spec["rows"], list) else [value]
    return dict(zip(row_keys(spec), values))


def cell_key(value):
    """A row value as a dict key (several-key rows are lists in the YAML)."""
    return tuple(value) if isinstance(value, list) else value


def build_table(done: pd.DataFrame, spec: dict) -> tuple[pd.DataFrame, list[str]]:
    """(one row per value of the table's row axis, the commands that would fill its gaps)."""
    rows, missing = [], []
    published = spec.get("published") or {}
    label = row_label(spec)
    for value in spec["values"]:
        settings = {**row_settings(spec, value), **spec["fixed"]}
        group = pick_group(done, settings)
        row = {label: "/".join(str(v) for v in row_settings(spec, value).values() if v is not None)}
        if group.empty:
            missing.append(fill_command(settings))
        else:
            row.update(summarise(group))
        if cell_key(value) in published:
            row["study_recon"], row["study_kl"], row["study_total"] = published[cell_key(value)]
        rows.append(row)
    table = pd.DataFrame(rows).reindex(columns=[label, *COLUMNS])
    for column in ("n", "epochs", "iw_samples", "knn_k"):
        table[column] = table[column].astype("Int64")
    table["total_diff"] = table["test_total_mean"] - table["study_total"]
    return table, missing


def _cell(value, digits: int = 2) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _mean_std(row: pd.Series, name: str, digits: int = 2) -> str:
    mean, std = row[f"test_{name}_mean"], row[f"test_{name}_std"]
    if pd.isna(mean):
        return DASH
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not pd.isna(std) else f"{mean:.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def table_markdown(table: pd.DataFrame, axis: str) -> str:
    """Our test Recon, KL and Total, and the study's numbers where it published some."""
    study = ["study_recon", "study_kl", "study_total", "total_diff"] if table["study_total"].notna().any() else []
    header = [axis, "Recon", "KL", "Total", "n", "epochs", "train Recon", "train KL", "train Total",
              *(["study Recon", "study KL", "study Total", "Δ Total"] if study else [])]
    rows = [[_cell(row[axis]), *(_mean_std(row, name) for name, _ in STATS), _cell(row["n"]), _cell(row["epochs"]),
             *(_cell(row[f"train_{name}"]) for name, _ in STATS), *(_cell(row[c]) for c in study)]
            for _, row in table.iterrows()]
    return _markdown(header, rows)


def evaluation_markdown(table: pd.DataFrame, axis: str) -> str:
    """The end-of-run evaluation: the columns that have a value in some row."""
    shown = [(name, header) for name, header in EVALUATION if table[f"test_{name}_mean"].notna().any()]
    digits = {"knn_accuracy": 3, "sharpness": 3, "active_units": 1}
    rows = [[_cell(row[axis]), *(_mean_std(row, name, digits.get(name, 2)) for name, _ in shown), _cell(row["n"])]
            for _, row in table.iterrows()]
    return _markdown([axis, *(header for _, header in shown), "n"], rows)


def prior_verdict(table: pd.DataFrame, axis: str, setting: str) -> str:
    """Whether the best mixture prior beats the standard one on the IW log p(x), in words."""
    by_label = table.set_index(axis)
    mixtures = by_label[by_label.index.str.startswith("gmm") & by_label["test_log_px_mean"].notna()]
    if "standard" not in by_label.index or pd.isna(by_label.loc["standard", "test_log_px_mean"]) or mixtures.empty:
        return f"{setting}: not enough finished runs to compare the priors yet."
    standard = by_label.loc["standard"]
    best_label = mixtures["test_log_px_mean"].idxmax()
    best = mixtures.loc[best_label]
    gain = best["test_log_px_mean"] - standard["test_log_px_mean"]
    spread = np.nansum([standard["test_log_px_std"], best["test_log_px_std"]])
    if min(standard["n"], best["n"]) < 2:
        judged = "with one seed each, too few to tell the difference from noise"
    elif abs(gain) <= spread:
        judged = "within the spread over seeds: no clear difference"
    else:
        judged = "beyond the spread over seeds"
    held = "held" if gain > 0 and "beyond" in judged else "did not clearly hold"
    return (f"{setting}: the best mixture prior ({best_label}) reaches log p(x) = {best['test_log_px_mean']:.2f} "
            f"against {standard['test_log_px_mean']:.2f} for the standard prior, a difference of {gain:+.2f} nats, "
            f"{judged}. The study's hypothesis that a mixture prior helps {held} here.")


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


def compose_artifacts(title: str, images: dict[str, np.ndarray]) -> Figure:
    """The images side by side under ``title``, each labelled when there are several."""
    width = sum(image.shape[1] for image in images.values())
    height = max(image.shape[0] for image in images.values()) + TITLE_BAND
    fig = Figure(figsize=(width / figures.DPI, height / figures.DPI), dpi=figures.DPI)
    fig.text(0.5, 1 - 8 / height, title, ha="center", va="top", fontsize=12)
    left = 0
    for label, image in images.items():
        h, w = image.shape[:2]
        ax = fig.add_axes((left / width, (height - TITLE_BAND - h) / height, w / width, h / height))
        ax.imshow(image, interpolation="nearest")
        ax.axis("off")
        if len(images) > 1:
            ax.text(0.5, 1.0 + 4 / h, label, transform=ax.transAxes, ha="center", va="bottom", fontsize=11,
                    weight="bold")
        left += w
    return fig


def compose_curves(client: MlflowClient, spec: dict, panels: dict[str, pd.DataFrame]) -> Figure:
    """Each panel's train and val loss per epoch, averaged over its seeds, on one axis."""
    curves = {}
    for label, group in panels.items():
        curves[label] = {}
        for stage in ("train", "val"):
            history = pd.DataFrame([(m.step, m.value) for run_id in group["run_id"]
                                    for m in client.get_metric_history(run_id, f"{stage}/loss")],
                                   columns=["epoch", "value"])
            curves[label][stage] = list(history.groupby("epoch")["value"].mean().items())
    seeds = max(len(group) for group in panels.values())
    return figures.loss_curves(curves, f"mean over up to {seeds} seed(s) per line", title=spec["title"])


# ---------------------------------------------------------------------------- the report


def build_report(client: MlflowClient, experiment: str, out: Path, source: str = "") -> dict:
    """Write tables (Markdown and CSV), figures (PNG) and report.md into ``out``; returns
    {"tables": {name: DataFrame}, "missing": {name: [command]}, "figures": {name: path}}."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    spec = yaml.safe_load(TABLES_FILE.read_text())
    runs = load_runs(client, experiment)
    done = finished_groups(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)

    tables, missing, cells = {}, {}, {}
    for name, table_spec in spec["tables"].items():
        table, gaps = build_table(done, table_spec)
        table.to_csv(out / f"{name}.csv", index=False)
        label = row_label(table_spec)
        (out / f"{name}.md").write_text(table_markdown(table, label) + "\n\n" + evaluation_markdown(table, label) + "\n")
        tables[name], missing[name] = table, gaps
        for value in table_spec["values"]:
            cells[(name, cell_key(value))] = pick_group(done, {**table_spec["fixed"], **row_settings(table_spec, value)})

    made, absent = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig_spec in spec["figures"].items():
            panels = {label: cells[(table, cell_key(value))] for label, (table, value) in fig_spec["panels"].items()}
            panels = {label: group for label, group in panels.items() if not group.empty}
            if fig_spec["kind"] == "curves":
                fig = compose_curves(client, fig_spec, panels) if panels else None
            else:
                images = panel_images(client, fig_spec["artifact"], panels, Path(tmp))
                panels = {label: panels[label] for label in images}
                fig = compose_artifacts(fig_spec["title"], images) if images else None
            absent[name] = [label for label in fig_spec["panels"] if label not in panels]
            if fig is None:
                continue
            made[name] = out / "figures" / f"{name}.png"
            fig.savefig(made[name])

    n_other = int((runs["status"] != "FINISHED").sum()) if len(runs) else 0
    (out / "report.md").write_text(report_markdown(spec, tables, missing, made, absent, len(done), n_other,
                                                   experiment, source))
    return {"tables": tables, "missing": missing, "figures": made}


def report_markdown(spec, tables, missing, made, absent, n_done, n_other, experiment, source) -> str:
    lines = [
        "# The VAE study, rebuilt from tracked runs", "",
        f"Built {time.strftime('%Y-%m-%d %H:%M')} from {n_done} FINISHED run(s) of the MLflow experiment "
        f"`{experiment}`{f' at `{source}`' if source else ''}; {n_other} run(s) that did not finish "
        "(FAILED, KILLED, RUNNING) are not counted.", "",
        "How to read the tables. *Recon*, *KL* and *Total* (= c * Recon + KL) are ours, per test image, "
        "as mean ± std over *n* seeds after *epochs* epochs. *train* columns are the training loss of the "
        "last epoch (mean over seeds). *study* columns are the published numbers (../shared/STUDY.md), "
        "most likely training figures of a single run. *Δ Total* = our test Total − the study's Total. "
        f"A {DASH} is a cell with no finished run; the commands under each table would fill it. "
        "Where several configurations match a cell (a quick and a full budget, say), the one with the most "
        "epochs is shown. Each table's CSV (beside this file) lists the MLflow run ids behind every row.", "",
    ]
    for name, table_spec in spec["tables"].items():
        table, label = tables[name], row_label(table_spec)
        samples = sorted({int(k) for k in table["iw_samples"].dropna()})
        lines += [f"## {table_spec['title']}", "", f"Fixed: {table_spec['setting']}. "
                  f"Filled by `python -m vae_sweeps experiment={table_spec['experiment']}`.", "",
                  table_markdown(table, label), "",
                  "The end-of-run evaluation of the same runs (ELBO and log p(x) by Monte Carlo; BCE, L2 and L1 "
                  "of the posterior-mean reconstructions; sharpness relative to the originals; "
                  f"K = {', '.join(map(str, samples)) or DASH} importance samples per image):", "",
                  evaluation_markdown(table, label), ""]
        if table_spec.get("verdict"):
            lines += [prior_verdict(table, label, table_spec["setting"]), ""]
        if missing[name]:
            lines += ["Missing cells; to fill them:", "", *[f"    {command}" for command in missing[name]], ""]
    lines += ["## Figures", ""]
    for name, fig_spec in spec["figures"].items():
        lines += [f"### {fig_spec['title']}", "", fig_spec["text"], ""]
        if name in made:
            lines += [f"![{fig_spec['title']}](figures/{made[name].name})", ""]
        if absent[name]:
            what = "Not drawn" if name not in made else "Left out"
            lines += [f"{what}: no finished run (with this figure) for {', '.join(absent[name])}; "
                      "see the tables' missing cells.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    defaults = OmegaConf.load(PROJECT / "conf" / "config.yaml").tracking
    parser = argparse.ArgumentParser(prog="python -m vae_sweeps.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder (default: reports)")
    parser.add_argument("--tracking-uri", default=defaults.uri,
                        help=f"MLflow store (default: $MLFLOW_TRACKING_URI, else {defaults.uri})")
    parser.add_argument("--experiment", default=defaults.experiment, help="MLflow experiment name")
    args = parser.parse_args(argv)
    uri = tracking.resolve_uri(args.tracking_uri)
    tracking.repair_moved_store(uri)  # a moved SQLite store: find its figures beside it
    result = build_report(MlflowClient(tracking_uri=uri), args.experiment, args.out, tracking.redact(uri))
    gaps = sum(len(m) for m in result["missing"].values())
    print(f"Wrote {args.out / 'report.md'}: {len(result['tables'])} tables ({gaps} missing cells), "
          f"{len(result['figures'])} figures.")


if __name__ == "__main__":
    main()
