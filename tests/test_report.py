"""`make report` on a handful of real short runs (tiny data): tables, gaps, exclusions, figures."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_tiny, png_size, tmp_store
from matplotlib.image import imread
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from vae_sweeps import claims, figures, store, study_store
from vae_sweeps import report as reporting
from vae_sweeps.errors import UserError
from vae_sweeps.figures import TITLE_BAND
from vae_sweeps.report import README_BEGIN, README_END, build_report, differences, provenance
from vae_sweeps.report import main as report_main
from vae_sweeps.tables import PROJECT, fluctuation
from vae_sweeps.train import train

# (overrides, seed) of the real runs; mlp3/bce/z2 runs twice, so its cells have n = 2.
RUNS = [("model.latent_dim=2", 0), ("model.latent_dim=2", 1), ("loss=l1", 0), ("loss=l2", 0),
        ("model.latent_dim=1", 0), ("model.latent_dim=20", 0), ("prior=gmm", 0), ("prior=none", 0)]


def fake_run(client, experiment_id, params: dict, metrics: dict, status: str | None, start_time: int) -> str:
    """A run with these params and metrics, ended with ``status`` (None: left RUNNING)."""
    run = client.create_run(experiment_id, start_time=start_time)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, v, 0, 1) for k, v in metrics.items()])
    if status:
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_root):
    tmp_path = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        results = [train(compose_tiny(tmp_path, tiny_root, overrides, f"seed={seed}", "model=mlp3"))
                   for overrides, seed in RUNS]
    client = tmp_store(tmp_path)
    base = client.get_run(results[0]["run_id"])
    experiment_id, params = base.info.experiment_id, base.data.params
    poison = {"test/loss": 1e6, "test/recon": 1e6, "test/kl": 1e6}
    fakes = {
        # a FAILED run of the same configuration: never counted
        "failed": fake_run(client, experiment_id, {**params, "seed": "2"}, poison, "FAILED", base.info.start_time + 1),
        # an older run of seed 0: the latest run of a seed is the one that counts
        "older": fake_run(client, experiment_id, params, poison, "FINISHED", base.info.start_time - 10_000),
        # a 1-epoch run of the same settings: a smaller budget, so not the group shown
        "short": fake_run(client, experiment_id, {**params, "trainer.max_epochs": "1"}, poison, "FINISHED",
                          base.info.start_time + 2),
        # a run still training (no end time): never counted, and ended (KILLED) in a published copy
        "live": fake_run(client, experiment_id, {**params, "seed": "3"}, poison, None, base.info.start_time + 3),
    }
    out = tmp_path / "reports"
    return build_report(client, "vae_sweeps", out), results, fakes, out


def test_table_values_are_the_mean_and_std_of_the_logged_metrics(report):
    built, results, fakes, out = report
    table = pd.read_csv(out / "table2.csv").set_index("loss.name")
    pair = [results[0], results[1]]  # mlp3 / bce / latent 2, seeds 0 and 1
    for column, metric in (("recon", "test/recon"), ("kl", "test/kl"), ("total", "test/loss")):
        values = np.array([r[metric] for r in pair])
        assert table.loc["bce", f"test_{column}_mean"] == pytest.approx(values.mean())
        assert table.loc["bce", f"test_{column}_std"] == pytest.approx(values.std(ddof=1))
    assert table.loc["bce", "n"] == 2 and table.loc["bce", "epochs"] == 2 and table.loc["bce", "seeds"] == "0 1"
    assert table.loc["bce", "study_total"] == 138.43
    assert table.loc["bce", "total_diff"] == pytest.approx(np.mean([r["test/loss"] for r in pair]) - 138.43)
    assert table.loc["l1", "n"] == 1 and pd.isna(table.loc["l1", "test_total_std"])
    assert table.loc["l1", "test_total_mean"] == pytest.approx(results[2]["test/loss"])
    for column in ("log_px", "elbo", "knn_accuracy", "active_units", "sharpness", "recon_l1"):
        assert table.loc["bce", f"test_{column}_mean"] == pytest.approx(np.mean([r[f"test/{column}"] for r in pair]))
    assert table.loc["bce", "iw_samples"] == 50 and table.loc["bce", "knn_k"] == 5


def test_the_priors_table_and_its_verdict(report):
    built, results, _, out = report
    table = pd.read_csv(out / "priors_z2.csv").set_index("prior.name/prior.kl")
    assert table["n"].to_dict() == pytest.approx({"standard": 2, "gmm/bound": np.nan, "gmm/tight": 1,
                                                  "gmm/mc": np.nan, "none": 1}, nan_ok=True)
    assert table.loc["gmm/tight", "test_log_px_mean"] == pytest.approx(results[6]["test/log_px"])
    assert table.loc["gmm/tight", "test_kl_bound_gap_mean"] == pytest.approx(results[6]["test/kl_bound_gap"])
    assert pd.isna(table.loc["none", "test_log_px_mean"])  # an autoencoder has no likelihood
    # Table 1 holds the standard prior only
    assert pd.read_csv(out / "table1.csv").set_index("model.name").loc["mlp3", "n"] == 2
    report_md = (out / "report.md").read_text()
    # under each priors table, the verdict of its claim (claims.yaml), the one rule for it
    priors_z2 = report_md[report_md.index("## Priors at latent dim 2"):report_md.index("## Priors at latent dim 10")]
    # claim 8 is the study's bound, which no run here used; 8-tight is ours, on runs of n = 1 and 2
    by_id = {spec["id"]: (spec, verdict) for spec, verdict in built["claims"]}
    assert by_id["8"][1].verdict == "inconclusive" and "gmm/bound" in by_id["8"][1].evidence
    assert f"- {claims.headline(*by_id['8-tight'])}" in priors_z2 and "too few seeds" in by_id["8-tight"][1].why
    assert "**8b." not in priors_z2 and "**1." not in priors_z2
    table1 = report_md[report_md.index("## Table 1"):report_md.index("## Table 2")]
    assert [line[4:7] for line in table1.splitlines() if line.startswith("- **")] == ["1. ", "2. ", "3. "]
    assert "python -m vae_sweeps -m prior=gmm prior.kl=bound model=mlp3 model.latent_dim=2" in report_md
    markdown = (out / "priors_z2.md").read_text()
    assert "| gmm/tight |" in markdown and "study Recon" not in markdown and "tight - MC" in markdown


def test_train_columns_are_the_last_epoch(report):
    built, results, _, out = report
    client = tmp_store(out.parent)
    table = pd.read_csv(out / "table3.csv").set_index("model.latent_dim")
    last = client.get_metric_history(results[4]["run_id"], "train/loss")[-1]
    assert last.step == 2 and table.loc[1, "train_total"] == pytest.approx(last.value)


def test_the_csv_carries_the_run_ids(report):
    _, results, _, out = report
    table = pd.read_csv(out / "table2.csv").set_index("loss.name")
    assert table.loc["bce", "run_ids"].split() == [results[0]["run_id"], results[1]["run_id"]]
    assert table.loc["l2", "run_ids"] == results[3]["run_id"]


def test_failed_older_and_smaller_budget_runs_are_not_counted(report):
    _, _, fakes, out = report
    tables = [p for p in out.glob("*.csv") if p.name not in ("claims.csv", "runs.csv")]
    every_id = " ".join(pd.concat([pd.read_csv(p)["run_ids"].dropna() for p in tables]))
    assert not any(fake in every_id for fake in fakes.values())
    assert "2 run(s) that did not finish" in (out / "report.md").read_text()  # the FAILED and the live one


def test_missing_cells_show_a_dash_and_are_listed(report):
    built, _, _, out = report
    markdown = (out / "table1.md").read_text()
    assert "| mlp2 | — | — | — | — | — |" in markdown
    assert "| mlp3 | " in markdown and "| mlp3 | —" not in markdown
    assert pd.isna(pd.read_csv(out / "table1.csv").set_index("model.name").loc["mlp2", "test_total_mean"])
    assert built["missing"]["table1"] == [
        f"python -m vae_sweeps -m model={m} model.latent_dim=2 loss=bce loss.c=1.0 data=mnist prior=standard seed=0,1,2,3,4"
        for m in ("mlp2", "mlp4", "cnn")]
    report_md = (out / "report.md").read_text()
    assert "model=mlp4 model.latent_dim=2 loss=bce" in report_md
    assert len(built["missing"]["fashion_table1"]) == 4  # no Fashion-MNIST run at all


def test_every_figure_is_a_png_of_the_expected_size(report):
    built, _, _, out = report
    size = figures.SIZES

    def side_by_side(name, panels):
        return size[name][0] * panels, size[name][1] + TITLE_BAND

    expected = {
        "fig3_reconstructions": side_by_side("reconstructions", 3),
        "fig4a_latent1": side_by_side("traversal_1d", 1),
        "fig4b_latent2": side_by_side("grid_2d", 1),
        "fig4b_quantiles": side_by_side("quantile_grid", 1),
        "latent_scatter": side_by_side("latent_scatter", 2),
        "reconstructions_dim20": side_by_side("reconstructions", 1),
        "samples": side_by_side("samples", 2),
        "curves_latent": size["loss_curves"],  # dims 1, 2, 20 of 5
        "curves_models": size["loss_curves"],  # mlp3 only
        "priors_latent_scatter": side_by_side("latent_scatter", 3),  # standard, gmm tight, none
        "priors_samples": side_by_side("samples", 3),
    }
    assert {name: png_size(path) for name, path in built["figures"].items()} == expected
    for path in built["figures"].values():
        assert imread(path).std() > 0.01  # not blank
    report_md = (out / "report.md").read_text()
    for name in expected:
        assert f"](figures/{name}.png)" in report_md
    assert "Left out: no finished run (with this figure) for dim 5, dim 10;" in report_md
    assert "Not drawn: no finished run (with this figure) for L1, L2, BCE;" in report_md  # Fashion-MNIST


def test_report_command_reads_the_store_from_the_environment(report, tmp_path):
    _, _, _, out = report
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out.parent}/mlruns/mlflow.db"}
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nResults:\n\n{README_BEGIN}\nold numbers\n{README_END}\n\n## Next\n")
    done = subprocess.run([sys.executable, "-m", "vae_sweeps.report", "--out", str(tmp_path / "r"),
                           "--readme", str(readme)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"Wrote {tmp_path / 'r' / 'report.md'}: 9 tables" in done.stdout
    assert (tmp_path / "r" / "table1.csv").read_text() == (out / "table1.csv").read_text()
    # the README's block now holds the summary, and the rest of it is as it was
    summary = (tmp_path / "r" / "summary.md").read_text().strip()
    assert readme.read_text() == f"# Title\n\nResults:\n\n{README_BEGIN}\n{summary}\n{README_END}\n\n## Next\n"


def test_a_readme_without_a_results_block_is_refused_before_the_report_is_built(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    with pytest.raises(SystemExit) as stop:
        report_main(["--out", str(tmp_path / "r"), "--tracking-uri", f"sqlite:///{tmp_path}/none.db",
                     "--readme", str(readme)])
    assert stop.value.code == 2 and "has no block to write the results into" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "none.db").exists()
    assert readme.read_text() == "# Title\n"


def test_the_summary_gives_each_claims_verdict_and_each_tables_numbers(report):
    built, results, _, out = report
    summary = (out / "summary.md").read_text()
    for spec, verdict in built["claims"]:
        assert f"| {spec['id']}. {spec['claim']} | **{verdict.verdict}** | {verdict.adjusted} | {verdict.why} |" in summary
    pair = [results[0], results[1]]  # mlp3 / bce / latent 2, seeds 0 and 1: Table 2's bce row
    total, log_px = (np.array([r[key] for r in pair]) for key in ("test/loss", "test/log_px"))
    row = f"| bce | {np.mean([r['test/recon'] for r in pair]):.2f} ± "
    line = next(line for line in summary[summary.index("**Table 2"):].splitlines() if line.startswith(row))
    assert (f"| {total.mean():.2f} ± {total.std(ddof=1):.2f} | {log_px.mean():.2f} ± {log_px.std(ddof=1):.2f} "
            f"| 2 † | 2 | 138.43 | {total.mean() - 138.43:.2f} |") in line  # † : 2 epochs, not the study's 30
    assert summary.startswith("Provenance of the counted runs:")


def test_the_readme_quotes_the_published_summary():
    """README.md's results block is results/summary.md as `make results` wrote it (never edited by hand)."""
    readme = (PROJECT / "README.md").read_text()
    block = readme[readme.index(README_BEGIN) + len(README_BEGIN):readme.index(README_END)]
    assert block.strip() == (PROJECT / "results" / "summary.md").read_text().strip()


def test_the_report_checks_the_studys_claims(report):
    built, results, _, out = report
    text = (out / "report.md").read_text()
    assert "## The study's claims, checked" in text
    by_id = {spec["id"]: verdict for spec, verdict in built["claims"]}
    assert by_id["1"].verdict == "inconclusive" and by_id["1"].missing == ["table1"]  # no mlp2 run
    assert "**1. 2 -> 3 MLP layers lowers the loss clearly" in text and "— **inconclusive**" in text
    assert "`python -m vae_sweeps experiment=table1`" in text
    assert "Adjusted: Holm-Bonferroni over the" in text
    # claim 7 reads the two seeds of mlp3 at latent dim 2 against the pixels' PCA-2 of the same runs
    knn, pca = ([r[f"test/{m}"] for r in results[:2]] for m in ("knn_accuracy", "knn_accuracy_pca2"))
    assert f"{np.mean(knn):.4g}" in by_id["7"].evidence and f"{np.mean(pca):.4g}" in by_id["7"].evidence
    assert "n = 2" in by_id["7"].evidence
    assert pd.read_csv(out / "claims.csv")["id"].astype(str).tolist()[:3] == ["1", "2", "3"]


def test_every_counted_run_is_one_row_of_runs_csv_with_its_provenance(report):
    built, results, fakes, out = report
    table = pd.read_csv(out / "runs.csv")
    # every FINISHED run, the latest of each seed of each configuration (the 1-epoch one too)
    assert sorted(table["run_id"]) == sorted([r["run_id"] for r in results] + [fakes["short"]])
    row = table.set_index("run_id").loc[results[0]["run_id"]]
    assert row["model.name"] == "mlp3" and row["test/loss"] == pytest.approx(results[0]["test/loss"])
    assert row["torch_version"] == torch.__version__ and row["cpu_count"] == os.cpu_count()
    text = (out / "report.md").read_text()
    assert f"torch `{torch.__version__}`" in text and "hours of training and evaluation" in text


def test_provenance_gives_the_compute_time_and_the_wall_time_from_first_start_to_last_end():
    hour = 3.6e6  # ms
    done = pd.DataFrame({"commit": ["abc", "abc"], "host": ["vm", "vm"], "cpu_count": [2, 2], "torch_threads": [1, 1],
                         "torch_version": ["2.14.1", "2.14.1"], "start_time": [0, 3 * hour],
                         "end_time": [0.5 * hour, 4 * hour],
                         "command": ["python -m vae_sweeps experiment=table1"] * 2})
    text = provenance(done)
    # 0.5 h + 1 h of runs, 4 h from the first start to the last end
    assert "1.5 hours of training and evaluation" in text and "4.0 hours from the first run's start" in text
    assert "commit(s) `abc`" in text and "`make study`" in text
    assert "(each run's `command` tag): `python -m vae_sweeps experiment=table1` (2 runs)." in text
    many = pd.concat([done, done.assign(command=["python -m vae_sweeps -m seed=3", None])])
    assert ("`python -m vae_sweeps -m seed=3` (1 run); `python -m vae_sweeps experiment=table1` (2 runs)."
            in provenance(many))  # sorted; a run without the tag (trained by the Python API) is not listed
    assert "(each run's `command` tag): not recorded." in provenance(done.drop(columns="command"))


def test_a_published_store_rebuilds_the_report_byte_for_byte_and_is_left_as_it_was(report, tmp_path, capsys,
                                                                                    monkeypatch):
    """The study's records alone (results/store/mlflow.db, no artifacts) give the same tables,
    claims, CSVs and summary as the store they were published from: make check-results (whose
    --tracking-uri wins over a team's MLFLOW_TRACKING_URI)."""
    _, _, _, out = report
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    published = tmp_path / "store" / "mlflow.db"
    study_store.publish(out.parent / "mlruns" / "mlflow.db", published)
    before = published.read_bytes()
    report_main(["--tracking-uri", f"sqlite:///{published}", "--check", str(out)])
    assert "byte for byte" in capsys.readouterr().out
    assert published.read_bytes() == before  # reading the published store writes nothing into it
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in out.glob("*.*"):
        (changed / path.name).write_bytes(path.read_bytes())
    (changed / "table2.csv").write_text((out / "table2.csv").read_text().replace("bce", "BCE", 1))
    with pytest.raises(SystemExit) as stop:
        report_main(["--tracking-uri", f"sqlite:///{published}", "--check", str(changed)])
    assert stop.value.code == 1 and "differs from the report rebuilt from mlflow.db in: table2.csv" in capsys.readouterr().out
    assert differences(out, changed) == ["table2.csv"]


def test_results_and_their_published_records_are_one_copy_of_a_store_that_trains_on(report, tmp_path, monkeypatch,
                                                                                      capsys):
    """make results while the study trains on (--publish-store): a run that ends while the report
    is built is in neither results/ nor the records published with it, which rebuild results/
    byte for byte; a refused report publishes nothing."""
    _, results, _, out = report
    working = tmp_path / "study" / "mlflow.db"  # a copy of the fixture's store, its figures where they were
    study_store.copy_database(out.parent / "mlruns" / "mlflow.db", working)
    client = MlflowClient(tracking_uri=f"sqlite:///{working}")
    base = client.get_run(results[0]["run_id"])
    build = reporting.build_report

    def a_run_ends_meanwhile(*args, **kwargs):
        fake_run(client, base.info.experiment_id, {**base.data.params, "seed": "5"}, {"test/loss": 1.0}, "FINISHED",
                 base.info.start_time + 5)
        return build(*args, **kwargs)

    published, folder = tmp_path / "results" / "store" / "mlflow.db", tmp_path / "results"
    monkeypatch.setattr(reporting, "build_report", a_run_ends_meanwhile)
    report_main(["--tracking-uri", f"sqlite:///{working}", "--out", str(folder), "--publish-store", str(published)])
    monkeypatch.undo()
    records = study_store.publish(working, tmp_path / "now.db") - 1  # all but the run that ended meanwhile
    said = capsys.readouterr().out
    assert f"Published the {records} run record(s) behind {folder / 'report.md'} to {published}." in said
    copy = MlflowClient(tracking_uri=f"sqlite:///{published}")
    seeds = {run.data.params["seed"] for run in copy.search_runs([base.info.experiment_id])}
    assert "5" not in seeds and "5" not in pd.read_csv(folder / "runs.csv")["seed"].astype(str).tolist()
    assert [p.name for p in published.parent.iterdir()] == ["mlflow.db"]  # no snapshot left beside it
    report_main(["--tracking-uri", f"sqlite:///{published}", "--check", str(folder)])
    assert "byte for byte" in capsys.readouterr().out

    before = published.read_bytes()
    empty = tmp_path / "empty" / "mlflow.db"
    store.open_store(f"sqlite:///{empty}", "vae_sweeps")
    with pytest.raises(SystemExit) as refused:
        report_main(["--tracking-uri", f"sqlite:///{empty}", "--out", str(folder), "--publish-store", str(published)])
    assert refused.value.code == 2 and "rebuilding it here would drop" in capsys.readouterr().err
    assert published.read_bytes() == before and not list(published.parent.glob(".snapshot-*"))


def test_the_real_published_store_rebuilds_results(capsys):
    """When results/ publishes its store, it rebuilds every table, claim, CSV and the summary."""
    published = PROJECT / "results" / "store" / "mlflow.db"
    if not published.is_file():
        pytest.skip("results/ publishes no store yet")
    report_main(["--tracking-uri", f"sqlite:///{published}", "--check", str(PROJECT / "results")])
    assert "byte for byte" in capsys.readouterr().out


def test_an_emptier_store_does_not_overwrite_a_published_report(report, tmp_path):
    _, _, _, out = report
    published = tmp_path / "results"
    published.mkdir()
    for path in out.glob("*.*"):
        (published / path.name).write_bytes(path.read_bytes())
    counted = pd.read_csv(published / "runs.csv")["run_id"].tolist()
    empty = tmp_store(tmp_path)  # this test's own store, with no run
    with pytest.raises(UserError, match=rf"counts {len(counted)} runs and this store 0: rebuilding it here would "
                                        rf"drop {len(counted)} run\(s\) not named by --drop \({min(counted)[:8]}"):
        build_report(empty, "vae_sweeps", published)
    assert (published / "runs.csv").read_text() == (out / "runs.csv").read_text()  # nothing written
    with pytest.raises(UserError, match="would drop 1 run"):
        build_report(empty, "vae_sweeps", published, drop={run_id[:8] for run_id in counted[1:]})
    build_report(empty, "vae_sweeps", published, drop={"all"})  # told to
    assert pd.read_csv(published / "runs.csv").empty


def test_a_store_without_the_runs_images_keeps_the_figures_the_same_runs_gave(report, tmp_path):
    """Published records carry no artifacts: rebuilt from them on a new machine, an image figure
    stays as the last build drew it when its panels show the same runs, and is not drawn when
    they are other runs (or there is no earlier build)."""
    built, _, _, out = report
    sources = pd.read_csv(out / "figures" / reporting.SOURCES)
    fig3 = sources[sources["figure"] == "fig3_reconstructions"].set_index("panel")
    counted = pd.read_csv(out / "runs.csv").set_index("run_id")
    for panel, loss in (("L1", "l1"), ("L2", "l2"), ("BCE", "bce")):  # each panel's lowest seed of its cell
        cell = counted[(counted["loss.name"] == loss) & (counted["model.latent_dim"] == 2)
                       & (counted["prior.name"] == "standard")]
        assert fig3.loc[panel, "run_id"] == cell["seed"].idxmin() and fig3.loc[panel, "seed"] == 0
    assert set(sources["figure"]) == {name for name in built["figures"] if not name.startswith("curves")}

    published = tmp_path / "results" / "store" / "mlflow.db"
    study_store.publish(out.parent / "mlruns" / "mlflow.db", published)
    restored = tmp_path / "elsewhere" / "mlflow.db"  # its artifact locations point beside it: no images there
    study_store.restore(published, restored)
    client = MlflowClient(tracking_uri=f"sqlite:///{restored}")

    again = tmp_path / "again"
    (again / "figures").mkdir(parents=True)
    for path in [*out.glob("*.*"), *out.glob("figures/*")]:
        (again / path.relative_to(out)).write_bytes(path.read_bytes())
    (again / "figures" / reporting.SOURCES).write_text((out / "figures" / reporting.SOURCES).read_text().replace(
        fig3.loc["L1", "run_id"], "0" * 32))  # the last build drew Fig. 3 from another run
    rebuilt = build_report(client, "vae_sweeps", again)
    kept = set(sources["figure"]) - {"fig3_reconstructions"}
    for name in kept:
        assert (again / "figures" / f"{name}.png").read_bytes() == (out / "figures" / f"{name}.png").read_bytes()
    assert set(rebuilt["figures"]) == kept | {"curves_latent", "curves_models"}
    report_md = (again / "report.md").read_text()
    assert report_md.count("As the last build of this report drew it") == len(kept)
    assert "Not drawn: no finished run (with this figure) for L1, L2, BCE;" in report_md.split("### Fig. 4a")[0]
    assert pd.read_csv(again / "figures" / reporting.SOURCES).equals(
        sources[sources["figure"] != "fig3_reconstructions"].reset_index(drop=True))

    fresh = build_report(client, "vae_sweeps", tmp_path / "fresh")  # a clone's first build: nothing to keep
    assert set(fresh["figures"]) == {"curves_latent", "curves_models"}


def test_fluctuation_is_the_spread_of_the_epoch_to_epoch_changes_over_the_last_half():
    # last half of 8 epochs: 10, 12, 11, 13 -> changes +2, -1, +2: std (ddof 1) = sqrt(3)
    assert fluctuation([50, 40, 30, 20, 10, 12, 11, 13]) == pytest.approx(3 ** 0.5)
    assert np.isnan(fluctuation([3.0, 2.0, 1.0]))  # one change in the last half: no spread


def test_the_report_reads_as_a_reviewer_needs(report):
    built, results, _, out = report
    table = pd.read_csv(out / "runs.csv").set_index("run_id")
    run = results[4]["run_id"]  # latent dim 1: its fluctuation from its own val/loss history
    history = [m.value for m in sorted(tmp_store(out.parent).get_metric_history(run, "val/loss"), key=lambda m: m.step)]
    assert table.loc[run, "val/loss_fluctuation"] == pytest.approx(fluctuation(history), nan_ok=True)
    assert table.loc[results[0]["run_id"], "classes_drawn"] == tmp_store(out.parent).get_run(
        results[0]["run_id"]).data.tags["classes_drawn"]
    text = (out / "report.md").read_text()
    assert "not a normalised density" in text and "docs/study.md" in text and "../shared" not in text
    assert "This report was built by the code at commit `" in text and "Lightning" in text and "MLflow" in text
    assert "The judges behind the judged metrics (judge.py): mnist-" in text and "test accuracy" in text
    (judge_run,) = {tmp_store(out.parent).get_run(r["run_id"]).data.tags["judge_run"] for r in results}
    assert f"run `{judge_run}`, test accuracy" in text and f"{len(results)} counted run(s) judged" in text
    assert str(out.parent) not in text  # no path of the machine that built it
    evaluation = (out / "table2.md").read_text()
    assert "log p(x), IW (Bernoulli, c = 1)" in evaluation and "IW bound of the training objective" in evaluation
    assert "| bce |" in evaluation


def test_each_counted_run_is_credited_to_the_judge_that_judged_it():
    """Its tag judge_run, else the judge of its dataset that finished last before the run ended
    (a store restored on a new machine trains a judge of its own)."""
    judges = [{"dataset": "fashion_mnist-f", "run_id": "F", "accuracy": 0.9, "end_time": 50},
              {"dataset": "mnist-m", "run_id": "A", "accuracy": 0.9899, "end_time": 100},
              {"dataset": "mnist-m", "run_id": "B", "accuracy": 0.9901, "end_time": 200},
              {"dataset": "mnist-m", "run_id": "U", "accuracy": None, "end_time": 300}]
    done = pd.DataFrame({"data.name": ["mnist", "mnist", "mnist", "mnist", "fashion_mnist", "mnist"],
                         "end_time": [150, 250, 260, 400, 300, 500],
                         "judge_run": [None, None, "A", "U", None, None],
                         "metrics.test/judged_accuracy": [0.8, 0.8, 0.8, 0.8, 0.7, np.nan]})
    assert reporting.judged_by(done, judges).fillna("none").tolist() == ["A", "B", "A", "U", "F", "none"]
    built = {"commit": "abc", "dirty": False, "versions": {"torch": "2"}, "judges": judges}
    text = reporting.built_by(built, done)
    assert ("mnist-m: run `A`, test accuracy 98.99%, 2 counted run(s) judged; mnist-m: run `B`, test accuracy 99.01%, "
            "1 counted run(s) judged; mnist-m: run `U`, 1 counted run(s) judged") in text
    assert "fashion_mnist-f: run `F`, test accuracy 90.00%, 1 counted run(s) judged" in text
    assert "The runs of mnist-m were judged by more than one judge" in text
    assert "more than one judge" not in reporting.built_by(built, done.iloc[[0, 2, 4]])


def test_the_builder_counts_changes_to_the_code_not_the_reports_own_files(tmp_path, monkeypatch):
    # a publication builds from a snapshot of the store in results/store/.snapshot-*: untracked
    # while the report is built, it made every published report say "with uncommitted changes"
    project = tmp_path / "project"
    (project / "results").mkdir(parents=True)
    (project / "code.py").write_text("x = 1\n")
    (project / "results" / "table1.md").write_text("old\n")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)
    monkeypatch.setattr(reporting, "PROJECT", project)
    client = tmp_store(tmp_path)
    assert reporting.builder(client, "vae_sweeps")["dirty"] is False
    (project / "results" / "store" / ".snapshot-abc").mkdir(parents=True)
    (project / "results" / "store" / ".snapshot-abc" / "mlflow.db").write_bytes(b"records")
    (project / "results" / "table1.md").write_text("new\n")
    assert reporting.builder(client, "vae_sweeps")["dirty"] is False
    (project / "code.py").write_text("x = 2\n")
    assert reporting.builder(client, "vae_sweeps")["dirty"] is True
    subprocess.run(["git", "checkout", "code.py"], cwd=project, check=True)
    (project / "new_prior.py").write_text("")  # a file the code may import, not yet committed
    assert reporting.builder(client, "vae_sweeps")["dirty"] is True
