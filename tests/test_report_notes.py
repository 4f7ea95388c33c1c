"""The report's notes: cells whose runs left the default settings, evaluation tables with no
run yet, and figure titles that say what is missing and fit their figure."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from matplotlib.backends.backend_agg import FigureCanvasAgg
from mlflow.entities import Metric, Param

from vae_sweeps import figures, identity, metrics, store, tables
from vae_sweeps.figures import TITLE_BAND, TITLE_LINE, compose_artifacts
from vae_sweeps.metrics import PRIOR_OWN, shown
from vae_sweeps.report import build_report

METRICS = {"test/recon": 130.0, "test/kl": 7.0, "test/loss": 137.0, "test/elbo": -137.0, "train/loss": 140.0,
           "val/loss": 139.0}


def logged_run(client, experiment_id, *overrides: str, seed: int = 0, metrics: dict = METRICS) -> str:
    """A FINISHED run with the params of ``python -m vae_sweeps <overrides>`` (nothing trained)."""
    with initialize_config_dir(config_dir=str(identity.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"seed={seed}", "paths.output_dir=."])
    run_id = client.create_run(experiment_id).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in identity.params(cfg).items()],
                     metrics=[Metric(k, v, 0, 30) for k, v in metrics.items()])
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("notes")
    client, experiment_id = store.open_store(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "vae_sweeps")
    logged_run(client, experiment_id)  # the defaults: table2's bce cell
    logged_run(client, experiment_id, "model=cnn")  # a model with widths of its own: still its defaults
    logged_run(client, experiment_id, "loss=l1", "trainer.max_epochs=4", "+trainer.limit_train_batches=0.25")
    for seed, recon in ((0, 120.0), (1, 124.0)):  # c = 2: Total = 2 * Recon + KL
        logged_run(client, experiment_id, "loss.c=2", seed=seed,
                   metrics={**METRICS, "test/recon": recon, "test/loss": 2 * recon + 7.0})
    build_report(client, "vae_sweeps", tmp_path / "reports")
    return tmp_path / "reports"


def test_a_cell_off_the_defaults_is_flagged_and_explained(notes):
    table2 = (notes / "table2.md").read_text()
    assert "| l1 | 130.00 | 7.00 | 137.00 | 1 † | 4 |" in table2
    assert "| bce | 130.00 | 7.00 | 137.00 | 1 | 30 |" in table2  # the defaults: no mark
    assert ("- l1: trainer.limit_train_batches = 0.25 (not in the current config), "
            "trainer.max_epochs = 4 (default 30)") in table2
    csv = pd.read_csv(notes / "table2.csv").set_index("loss.name")
    assert pd.isna(csv.loc["bce", "non_default"]) and csv.loc["l1", "non_default"].startswith("trainer.limit")
    table1 = (notes / "table1.md").read_text()
    assert "| cnn | 130.00 | 7.00 | 137.00 | 1 | 30 |" in table1 and "†" not in table1
    assert "A † after *n* marks runs with settings other than the defaults" in (notes / "report.md").read_text()


def test_a_table_with_c_other_than_1_names_its_total_and_shows_recon_plus_kl(notes):
    c_sweep = (notes / "c_sweep.md").read_text()
    assert "| loss.c | Recon | KL | Total (= c * Recon + KL) | Recon + KL | n |" in c_sweep
    # seeds 0 and 1: Recon 120 and 124, KL 7: Total 247 and 255; Recon + KL 127 and 131
    assert "| 2.0 | 122.00 ± 2.83 | 7.00 ± 0.00 | 251.00 ± 5.66 | 129.00 ± 2.83 | 2 |" in c_sweep
    assert "| 1.0 | 130.00 | 7.00 | 137.00 | 137.00 | 1 |" in c_sweep
    assert "Recon + KL" not in (notes / "table2.md").read_text()  # c = 1 in every row: Total is Recon + KL
    summary = (notes / "summary.md").read_text()
    assert "| loss.c | Recon | KL | Total (= c * Recon + KL) | Recon + KL | log p(x), IW (Bernoulli, c = 1) |" in summary


def test_an_evaluation_table_with_no_run_keeps_its_columns(notes):
    every = [m.header for m in shown() if not m.name.endswith("_objective")]
    general = [m.header for m in shown() if m.where is not PRIOR_OWN and not m.name.endswith("_objective")]
    assert f"| model.name | {' | '.join(general)} | n |" in (notes / "fashion_table1.md").read_text()
    # a priors table shows a mixture prior's KL columns too
    assert f"| prior.name/prior.kl | {' | '.join(every)} | n |" in (notes / "priors_z10.md").read_text()


def test_an_evaluation_column_s_header_and_digits_come_from_the_registry(monkeypatch):
    """The tables read the registry: a new entry is a column (its header, its digits), and an entry's digits
    are its cells'."""
    registry = [dataclasses.replace(m, digits=5) if m.name == "knn_accuracy" else m for m in metrics.METRICS]
    new = metrics.Metric("pixel_mean", "evaluation", "mean pixel", digits=4)
    monkeypatch.setattr(metrics, "METRICS", (*registry, new))
    done = pd.DataFrame({"run_id": ["a", "b"], "group": ["g", "g"], "seed": [0, 1], "start_time": [1, 2],
                         "model.name": ["mlp3", "mlp3"], "metrics.test/knn_accuracy": [0.5, 0.7],
                         "metrics.test/pixel_mean": [0.123456, 0.123456]})
    table, _ = tables.build_table(done, {"rows": "model.name", "values": ["mlp3"], "fixed": {}, "seeds": [0, 1]})
    assert {"test_pixel_mean_mean", "test_pixel_mean_std"} <= set(table.columns)  # a column of the CSV
    assert tables.evaluation_markdown(table, "model.name").splitlines() == [
        "| model.name | k-NN acc. | mean pixel | n |", "|---|---|---|---|",
        "| mlp3 | 0.60000 ± 0.14142 | 0.1235 ± 0.0000 | 2 |"]


def texts_fit(fig) -> bool:
    """Whether every text of ``fig`` lies within its width, as drawn into a PNG."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    width = fig.get_figwidth() * fig.dpi
    texts = [*fig.texts, *(t for ax in fig.axes for t in (ax.title, *ax.texts))]
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_text()]
    return all(box.x0 >= 0 and box.x1 <= width for box in boxes)


def test_a_composed_title_names_the_missing_panels_and_fits(tmp_path):
    panel = np.ones((760, 700, 3))
    title = "Samples from each prior, decoded (latent dim 2); for no prior, decoded N(0, I) draws"
    fig = compose_artifacts(title, {"gmm tight": panel}, ["standard", "none"])
    [text] = fig.texts
    assert text.get_text().replace("\n", " ") == f"{title} — standard, none: no finished run yet"
    lines = text.get_text().count("\n") + 1
    assert lines > 1 and fig.get_figheight() * fig.dpi == 760 + TITLE_BAND + TITLE_LINE * (lines - 1)
    assert texts_fit(fig)
    assert [t.get_text() for t in fig.axes[0].texts] == ["gmm tight"]  # the one panel drawn is named
    wide = compose_artifacts(title, {"standard": panel, "none": panel})
    assert "\n" not in wide.texts[0].get_text() and wide.get_figheight() * wide.dpi == 760 + TITLE_BAND


def test_a_long_caption_of_a_run_figure_fits():
    caption = ("mlp3 | bce | latent dim 2 | c = 1 | prior gmm (components 10, kl tight) | fashion_mnist | seed 0 "
               "| 30 epochs | run 0123abcd")
    fig = figures.samples(torch.rand(64, 1, 28, 28), caption)
    assert texts_fit(fig) and fig.texts[0].get_text().count("\n") == 1
