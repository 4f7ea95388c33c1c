"""Table 1, tuned, in the report: the winner of each arm's trials, the tuned table at the winners'
settings, the tuning studies' numbers, their equal-budget curves and trials CSV, and the tuned
claims; and a store without trials, whose report has none of it (fabricated runs, no training)."""

import shutil

import pandas as pd
import pytest
import yaml
from conftest import fake_trial, finished_run, png_size, tmp_store
from matplotlib.image import imread
from mlflow import MlflowClient

from vae_sweeps import claims, figures, tables, trials
from vae_sweeps.report import build_report

T0 = 10 ** 12  # ms: the trials end at T0 + the numbers below
# Each arm's trials: (study, trial, state, value, epochs, end, optim.lr, data.batch_size). mlp2: the
# PRUNED trial 1 has the lowest value but never wins; trial 2 does. mlp3: trials 0 and 1 tie, and
# trial 0 wins though trial 1 ended first. tune_other is another tuning experiment, whose mlp2
# trial is lower than any but is not table1_tuned's. mlp4 and cnn have no trials.
TRIALS = [("tune_table1/model=mlp2", 0, "COMPLETE", 150.0, 10, 10, "0.001", "128"),
          ("tune_table1/model=mlp2", 1, "PRUNED", 140.0, 3, 20, "0.01", "32"),
          ("tune_table1/model=mlp2", 2, "COMPLETE", 145.0, 10, 30, "0.003", "64"),
          ("tune_table1/model=mlp2", 3, "COMPLETE", 147.0, 10, 40, "0.0005", "256"),
          ("tune_table1/model=mlp3", 0, "COMPLETE", 139.0, 10, 20, "0.002", "64"),
          ("tune_table1/model=mlp3", 1, "COMPLETE", 139.0, 10, 10, "0.0007", "32"),
          ("tune_table1/model=mlp3", 2, "PRUNED", 135.0, 2, 30, "0.01", "16"),
          ("tune_other/model=mlp2", 0, "COMPLETE", 100.0, 5, 5, "0.1", "8")]
MLP2, MLP3 = {"optim.lr": "0.003", "data.batch_size": "64"}, {"optim.lr": "0.002", "data.batch_size": "64"}


def cell(model: str) -> dict:
    """The settings of table1_tuned's cell ``model``, before its tuned ones."""
    spec = yaml.safe_load(tables.TABLES_FILE.read_text())["tables"]["table1_tuned"]
    return tables.cell_settings(spec, model)


def fake_trials(client: MlflowClient, rows=TRIALS) -> None:
    for study, trial, state, value, epochs, end, lr, batch in rows:
        fake_trial(client, study, trial, state, value, epochs, T0 + end, {"optim.lr": lr, "data.batch_size": batch},
                   **{"model.name": study.split("=")[1]})


def study_run(client: MlflowClient, model: str, seed: int, loss: float, **settings) -> str:
    """A FINISHED run of the study at latent dim 2, BCE, MNIST with these test numbers."""
    return finished_run(client, "vae_sweeps", {"model.name": model, "seed": seed, **settings},
                        metrics={"test/loss": loss, "test/recon": loss - 6.0, "test/kl": 6.0},
                        val_losses=(loss + 5, loss + 1), end_time=T0 + 100 + seed)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, migrated_db):
    """A store with TRIALS and table1_tuned's runs at the winners' settings (mlp2: test/loss 150,
    151, 152; mlp3: 140, 141, 142), a decoy at the pruned trial's and at the losing tie's settings,
    a Table 1 run at the defaults; and the report built from it."""
    tmp_path = tmp_path_factory.mktemp("tuned")
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(migrated_db, tmp_path / "mlruns" / "mlflow.db")
    client = tmp_store(tmp_path)
    fake_trials(client)
    runs = {"mlp2": [study_run(client, "mlp2", seed, 150.0 + seed, **MLP2) for seed in range(3)],
            "mlp3": [study_run(client, "mlp3", seed, 140.0 + seed, **MLP3) for seed in range(3)],
            "pruned": study_run(client, "mlp2", 0, 1e6, **{"optim.lr": "0.01", "data.batch_size": "32"}),
            "tie": study_run(client, "mlp3", 0, 1e6, **{"optim.lr": "0.0007", "data.batch_size": "32"}),
            "table1": study_run(client, "mlp2", 0, 160.0)}
    out = tmp_path / "reports"
    return build_report(client, "vae_sweeps", out), runs, out, client


def test_each_arm_is_won_by_its_lowest_complete_trial_the_lower_number_on_a_tie(tuned):
    _, _, _, client = tuned
    found = trials.load_trials(client, "vae_sweeps")
    assert len(found) == len(TRIALS)
    tuned_settings = trials.tuned_by(found)
    assert tuned_settings("table1_tuned", "tune_table1", cell("mlp2")) == MLP2  # not the PRUNED 140, nor tune_other's
    assert tuned_settings("table1_tuned", "tune_table1", cell("mlp3")) == MLP3  # trial 0, though trial 1 ended first
    assert tuned_settings("table1_tuned", "tune_table1", cell("mlp4")) is None
    assert tuned_settings("table1_tuned", "tune_table1", {**cell("mlp2"), "seed": 0}) == MLP2  # the seed is left out
    best = trials.winner(found[found["study"] == "tune_table1/model=mlp2"])
    assert (best["trial"], best["value"], best["epochs"]) == (2, 145.0, 10)
    assert trials.winner(found[found["state"] == trials.PRUNED]) is None


def test_the_tuned_table_shows_each_arm_at_its_winners_settings_right_after_table_1(tuned):
    built, runs, out, _ = tuned
    table = pd.read_csv(out / "table1_tuned.csv").set_index("model.name")
    assert table.loc["mlp2", "run_ids"].split() == runs["mlp2"] and table.loc["mlp3", "run_ids"].split() == runs["mlp3"]
    assert table.loc["mlp2", "test_total_mean"] == pytest.approx(151.0)
    assert table.loc["mlp3", "test_total_std"] == pytest.approx(1.0)
    assert table["tuned"].fillna("").tolist() == ["optim.lr = 0.003, data.batch_size = 64",
                                                  "optim.lr = 0.002, data.batch_size = 64", "", ""]
    assert table["n"].fillna(0).tolist() == [3, 3, 0, 0]
    assert pd.isna(table.loc["mlp2", "non_default"])  # its tuned settings are its own: not flagged
    assert built["missing"]["table1_tuned"] == ["python -m vae_sweeps experiment=tune_table1",
                                                "python -m vae_sweeps experiment=table1_tuned"]
    # Table 1's mlp2 is its one run at the defaults, not the tuned runs with more seeds, nor the decoys
    assert pd.read_csv(out / "table1.csv").set_index("model.name").loc["mlp2", "run_ids"] == runs["table1"]
    text = (out / "report.md").read_text()
    order = [text.index(title) for title in ("## Table 1: architectures", "## Table 1, tuned", "## Table 2")]
    assert order == sorted(order)
    section = text[order[1]:order[2]]
    assert "Filled by `python -m vae_sweeps experiment=table1_tuned`, after its tuning study " in section
    # each arm's tuned Total beside its untuned one: mlp2's three tuned seeds (150, 151, 152) against Table 1's
    # one run (160); mlp3 has no run at the defaults (its decoy is at other settings), mlp4 no winner
    mlp2 = "- mlp2: optim.lr = 0.003, data.batch_size = 64; Total 151.00 ± 1.00 (n = 3) tuned, 160.00 (n = 1) untuned"
    mlp3 = "- mlp3: optim.lr = 0.002, data.batch_size = 64; Total 141.00 ± 1.00 (n = 3) tuned, no untuned run"
    for line in (mlp2, mlp3, "- mlp4: no COMPLETE trial yet", "    python -m vae_sweeps experiment=tune_table1"):
        assert f"\n{line}\n" in section
    assert f"{mlp2}\n" in (out / "table1_tuned.md").read_text()
    assert table.loc["mlp2", ["untuned_total_mean", "untuned_n"]].tolist() == [160.0, 1]
    assert "**Table 1, tuned: architectures, each at its tuned settings**" in (out / "summary.md").read_text()


def test_the_tuning_section_counts_each_studys_trials_and_epochs_and_names_its_winner(tuned):
    _, _, out, _ = tuned
    text = (out / "report.md").read_text()
    section = text[text.index("## Tuning studies"):text.index("## Figures")]
    assert "| study | trials (complete / pruned) | epochs spent | best validation loss | winner |" in section
    # epochs spent: 10 + 3 + 10 + 10 = 33, 10 + 10 + 2 = 22, 5
    assert "| tune_table1/model=mlp2 | 4 (3 / 1) | 33 | 145.00 | trial 2: optim.lr = 0.003, data.batch_size = 64 |" in section
    assert "| tune_table1/model=mlp3 | 3 (2 / 1) | 22 | 139.00 | trial 0: optim.lr = 0.002, data.batch_size = 64 |" in section
    assert "| tune_other/model=mlp2 | 1 (1 / 0) | 5 | 100.00 | trial 0: optim.lr = 0.1, data.batch_size = 8 |" in section
    # in the order the studies had a trial ended (5, 10, 10: a tie goes by name)
    rows = [section.index(f"| {study} |") for study in ("tune_other/model=mlp2", "tune_table1/model=mlp2",
                                                         "tune_table1/model=mlp3")]
    assert rows == sorted(rows)
    ended = pd.DataFrame({"study": ["t/mlp2", "t/cnn", "t/mlp2", "t/mlp3", "t/cnn"], "end_time": [3, 9, 1, 2, 5]})
    assert [study for study, _ in trials.by_study(ended)] == ["t/mlp2", "t/mlp3", "t/cnn"]  # not by name
    assert "vae_sweeps_tuning" in section and "](figures/tuning_curves.png)" in section


def test_the_trials_csv_lists_every_trial(tuned):
    _, _, out, client = tuned
    listed = pd.read_csv(out / "tuning_trials.csv", dtype={"optim.lr": str, "data.batch_size": str})
    assert list(listed.columns) == ["study", "trial", "state", "epochs", "value", "optim.lr", "data.batch_size", "run_id"]
    expected = sorted((study, trial, state, epochs, value, lr, batch)
                      for study, trial, state, value, epochs, _, lr, batch in TRIALS)
    assert [tuple(row) for row in listed.drop(columns="run_id").itertuples(index=False)] == expected
    pruned = listed[(listed["study"] == "tune_table1/model=mlp2") & (listed["trial"] == 1)].iloc[0]
    assert client.get_run(pruned["run_id"]).data.tags[trials.STATE] == "PRUNED"


def test_the_equal_budget_curve_is_the_running_best_against_the_epochs_spent(tuned):
    built, _, _, client = tuned
    found = trials.load_trials(client, "vae_sweeps")
    curve = {study: trials.equal_budget_curve(group) for study, group in found.groupby("study")}
    # mlp2 in the order the trials ended: 150 at 10 epochs; the pruned trial's 3 epochs, no point;
    # 145 at 23; 147 at 33 keeps 145
    assert curve["tune_table1/model=mlp2"] == [(10, 150.0), (23, 145.0), (33, 145.0)]
    # mlp3: trial 1 ended first; the pruned trial at the end carries the best on to its 2 epochs
    assert curve["tune_table1/model=mlp3"] == [(10, 139.0), (20, 139.0), (22, 139.0)]
    assert curve["tune_other/model=mlp2"] == [(5, 100.0)]
    path = built["figures"]["tuning_curves"]
    assert path.name == "tuning_curves.png" and png_size(path) == figures.SIZES["tuning_curves"]
    assert imread(path).std() > 0.01  # not blank


def test_the_tuned_claims_are_checked_and_counted_in_the_family(tuned):
    built, _, out, _ = tuned
    by_id = {spec["id"]: verdict for spec, verdict in built["claims"]}
    # mlp3 - mlp2: -10 nats (sd 1 each, n = 3): clearly below -1
    assert by_id["1-tuned"].verdict == "supported" and "n = 3" in by_id["1-tuned"].evidence
    assert by_id["2-tuned"].verdict == "inconclusive" and by_id["2-tuned"].missing == ["table1_tuned"]  # no mlp4 run
    assert "no finished runs for table1_tuned mlp4" in by_id["2-tuned"].why
    every = claims.load()["claims"]
    assert len(built["claims"]) == len(every)
    assert f"Holm-Bonferroni over the {claims.family_size(every)} interval tests" in (out / "claims.md").read_text()
    assert "- Why we test it: mlp3's lead over mlp2" in (out / "claims.md").read_text()
    text = (out / "report.md").read_text()
    section = text[text.index("## Table 1, tuned"):text.index("## Table 2")]
    assert [line[4:12] for line in section.splitlines() if line.startswith("- **")] == ["1-tuned.", "2-tuned.", "3-tuned."]


def test_without_trials_the_report_has_no_tuned_table_claims_or_tuning(tmp_path):
    client = tmp_store(tmp_path)
    study_run(client, "mlp2", 0, 160.0)
    out = tmp_path / "reports"
    built = build_report(client, "vae_sweeps", out)
    assert "table1_tuned" not in built["tables"] and not (out / "table1_tuned.csv").exists()
    assert not (out / "tuning_trials.csv").exists() and not (out / "figures" / "tuning_curves.png").exists()
    assert not any(spec["id"].endswith("-tuned") for spec, _ in built["claims"])
    every = claims.load()["claims"]
    family = claims.family_size([spec for spec in every if "table1_tuned" not in claims.tables_of(spec)])
    assert family == claims.family_size(every) - 3
    assert f"Holm-Bonferroni over the {family} interval tests" in (out / "claims.md").read_text()
    text = (out / "report.md").read_text()
    assert "Table 1, tuned" not in text and "Tuning studies" not in text and "tuning_curves" not in text


def test_with_trials_but_no_tuned_run_the_table_shows_its_gaps_and_its_claims_wait(tmp_path):
    client = tmp_store(tmp_path)
    fake_trials(client, TRIALS[:1])
    built = build_report(client, "vae_sweeps", tmp_path / "reports")
    assert built["tables"]["table1_tuned"]["tuned"].fillna("").tolist() == [
        "optim.lr = 0.001, data.batch_size = 128", "", "", ""]
    assert not any(spec["id"].endswith("-tuned") for spec, _ in built["claims"])  # out of the family too
    assert built["missing"]["table1_tuned"] == [
        "python -m vae_sweeps -m model=mlp2 model.latent_dim=2 loss=bce loss.c=1.0 data=mnist prior=standard "
        "optim.lr=0.001 data.batch_size=128 seed=0,1,2,3,4", "python -m vae_sweeps experiment=tune_table1",
        "python -m vae_sweeps experiment=table1_tuned"]
    assert "The claims on this table join the claims checked (and Holm's family) once it has a finished run." in (
        tmp_path / "reports" / "report.md").read_text()
