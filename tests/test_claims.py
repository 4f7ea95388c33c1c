"""The study's claims as data (experiments/claims.yaml) and their verdicts from intervals."""

import math

import pandas as pd
import pytest
import yaml
from scipy import stats

from vae_sweeps import claims
from vae_sweeps.tables import TABLES_FILE, cell_key

RULES = {"margins": {"nats": {"value": 1.0}, "share": {"value": 0.01}, "wide": {"value": 5.0}},
         "drawn_threshold": {"value": 0.01}}
Z = 1.959964 + 0.841621  # z_0.975 + z_0.8


def runs(metric: str, values, **columns) -> pd.DataFrame:
    return pd.DataFrame({f"metrics.test/{metric}": values, **columns})


def checked(spec: dict, cells: dict, settings=None) -> claims.Verdict:
    return claims.check(spec, lambda table, value: cells[table], settings, RULES)


def test_welch_interval_against_a_hand_computed_one():
    # means 2 and 5, variances 1 and 1, n = 3 each: se = sqrt(2/3), df = 4, t(0.975, 4) = 2.776445
    diff, low, high = claims.welch(pd.Series([1.0, 2, 3]).to_numpy(), pd.Series([4.0, 5, 6]).to_numpy())
    assert diff == -3 and low == pytest.approx(-3 - 2.776445 * (2 / 3) ** 0.5, abs=1e-5)
    assert high == pytest.approx(-3 + 2.267, abs=1e-3)


@pytest.mark.parametrize("a, b, verdict", [
    ([130.0, 131, 132], [140.0, 141, 142], "supported"),      # 10 nats lower, tight
    ([140.5, 141, 141.5], [140.0, 141, 142], "inconclusive"),  # within the spread
    ([150.0, 151, 152], [140.0, 141, 142], "contradicted"),    # clearly higher
    ([130.0], [140.0, 141, 142], "inconclusive"),               # one seed: no interval
])
def test_lower_verdict_follows_the_interval(a, b, verdict):
    cells = {"x": runs("loss", a), "y": runs("loss", b)}
    result = checked({"test": "lower", "metric": "loss", "a": ["x", 1], "b": ["y", 1], "margin": "nats"}, cells)
    assert result.verdict == verdict
    if len(a) == 1:
        assert "too few seeds" in result.why and "n = 1 and 3" in result.why and result.p_value is None
    else:  # the p-value agrees with the interval: below 2.5% exactly when the verdict is decided
        assert (result.p_value < 0.025) == (verdict != "inconclusive")


def test_beyond_zero_is_shown_beside_the_verdict_at_the_margin():
    # 0.5 nat lower, tight: se = sqrt(2 * 0.01 / 3), df = 4, interval -0.5 +- 2.776445 se =
    # [-0.727, -0.273]: beyond 0, and wholly short of the 1-nat margin
    spec = {"test": "lower", "metric": "loss", "a": ["x", 1], "b": ["y", 1], "margin": "nats"}
    cells = {"x": runs("loss", [140.4, 140.5, 140.6]), "y": runs("loss", [140.9, 141.0, 141.1])}
    result = checked(spec, cells)
    assert result.verdict == "contradicted" and result.beyond_zero == "yes" and "beyond 0: yes" in result.evidence
    assert result.why == "test/loss of x 1 is lower than that of y 1, but by less than 1 (the nats margin)"
    assert "margin 1 (nats)" in result.evidence and result.power == ""
    # its p-value: the one-sided test of "not below -1", t = (-0.5 + 1) / se
    assert result.p_value == pytest.approx(stats.t.sf(0.5 / math.sqrt(2 * 0.01 / 3), 4))
    # no difference at all, tight: contradicted at the margin, not beyond 0
    cells["x"] = runs("loss", [140.9, 141.0, 141.1])
    none = checked(spec, cells)
    assert none.verdict == "contradicted" and none.beyond_zero == "no"
    assert none.why == "test/loss of x 1 is not lower than that of y 1 by more than 1 (the nats margin)"
    # 0.5 nat lower with sd 0.5 a side: interval [-1.63, +0.63] straddles -1; to contradict it,
    # effect 1 - 0.5 = 0.5: n = Z^2 (0.25 + 0.25) / 0.25 = 15.7 -> 16 per arm
    cells = {"x": runs("loss", [140.0, 140.5, 141.0]), "y": runs("loss", [140.5, 141.0, 141.5])}
    straddling = checked(spec, cells)
    assert straddling.verdict == "inconclusive" and "the interval straddles -1" in straddling.why
    assert straddling.power.startswith("To contradict it: about 16 seeds per arm")


def test_not_lower_is_supported_by_an_interval_above_minus_the_margin():
    cells = {"x": runs("loss", [140.2, 140.9, 141.1]), "y": runs("loss", [140.0, 141, 142])}
    spec = {"test": "not_lower", "metric": "loss", "a": ["x", 1], "b": ["y", 1], "margin": "wide"}
    assert checked(spec, cells).verdict == "supported"
    cells["x"] = runs("loss", [120.0, 121, 122])
    assert checked(spec, cells).verdict == "contradicted"


def test_equivalence_by_two_one_sided_tests():
    spec = {"test": "equivalent", "metric": "loss", "a": ["x", 1], "b": ["y", 1], "margin": "nats"}
    se = math.sqrt(2 * 0.01 / 3)  # variances 0.01 and 0.01, n = 3 each: df = 4
    # inside: difference -0.1, interval -0.1 +- 2.776445 se = [-0.327, +0.127], within (-1, +1)
    cells = {"x": runs("loss", [140.0, 140.1, 140.2]), "y": runs("loss", [140.1, 140.2, 140.3])}
    inside = checked(spec, cells)
    assert inside.verdict == "supported" and inside.beyond_zero == "no"
    # TOST's p: the larger of the two one-sided ones, here the one against -1: t = 0.9 / se
    assert inside.p_value == pytest.approx(stats.t.sf(0.9 / se, 4))
    # beyond: difference +2, interval [1.77, 2.23], wholly above +1
    cells["x"] = runs("loss", [142.1, 142.2, 142.3])
    beyond = checked(spec, cells)
    assert beyond.verdict == "contradicted" and beyond.beyond_zero == "yes (above)"
    assert beyond.p_value == pytest.approx(stats.t.sf(1.0 / se, 4)) and "higher than" in beyond.why
    # straddling: difference -0.2 with sd 0.5 each, interval [-1.33, +0.93]
    cells = {"x": runs("loss", [140.0, 140.5, 141.0]), "y": runs("loss", [140.2, 140.7, 141.2])}
    straddling = checked(spec, cells)
    assert straddling.verdict == "inconclusive"
    # to show equivalence: effect 1 - 0.2 = 0.8, n = Z^2 (0.25 + 0.25) / 0.64 = 6.13 -> 7 per arm
    assert straddling.power.startswith("To show equivalence: about 7 seeds per arm")


def test_holm_step_down_on_a_hand_made_family():
    # m = 3 at 0.025: thresholds 0.025/3 = 0.00833, 0.025/2 = 0.0125, 0.025
    assert claims.holm([0.001, 0.01, 0.02]) == [True, True, True]
    # 0.015 > 0.0125 stops the steps: 0.02 fails too, though below 0.025
    assert claims.holm([0.02, 0.001, 0.015]) == [False, True, False]
    assert claims.holm([0.009, 0.001, 0.03]) == [True, True, False]


def test_adjusted_verdicts_over_a_family_and_outside_it():
    one = {"id": "A", "test": "lower"}
    both = {"id": "B", "test": "all_of", "parts": [{"test": "higher"}, {"test": "lower"}]}
    graded = {"id": "C", "test": "drawn"}
    parts = [claims.Verdict("supported", "", p_value=0.02), claims.Verdict("supported", "", p_value=0.013)]
    result = [(one, claims.Verdict("supported", "", p_value=0.001)),
              (both, claims.Verdict("supported", "", parts=parts, labels=["x", "y"])),
              (graded, claims.Verdict("partly supported", ""))]
    assert claims.adjust(result) == 3  # the graded test is outside the family
    # 0.001 <= 0.025/3 passes; 0.013 > 0.025/2 fails, and so does 0.02 after it
    assert result[0][1].adjusted == "supported"
    assert [p.adjusted for p in parts] == ["inconclusive", "inconclusive"]
    assert result[1][1].verdict == "supported" and result[1][1].adjusted == "inconclusive"
    assert result[2][1].adjusted == "partly supported"


def test_seeds_for_power_against_the_normal_approximation():
    # n = (z_0.975 + z_0.8)^2 (sd_a^2 + sd_b^2) / effect^2; Z^2 = 7.8489
    assert claims.seeds_for_power(1.0, 1.0, 1.0) == 16  # 15.70
    assert claims.seeds_for_power(0.5, 0.3, 0.4) == 8  # 7.85
    assert claims.seeds_for_power(2.0, 1.0, 1.0) == math.ceil(Z ** 2 * 2 / 4)


def test_an_undecided_claim_names_the_seeds_and_the_commands_that_would_decide_it():
    # difference -2.5, sd 1 each, n = 3: interval [-4.77, -0.23] reaches -1; to support it,
    # effect 1.5: n = Z^2 * 2 / 2.25 = 6.98 -> 7 per arm, seeds 3 to 6 on each side
    cells = {"x": runs("loss", [129.5, 130.5, 131.5], seed=[0, 1, 2]),
             "y": runs("loss", [132.0, 133, 134], seed=[0, 1, 2])}
    spec = {"test": "lower", "metric": "loss", "a": ["x", "mlp3"], "b": ["y", "mlp2"], "margin": "nats"}
    result = checked(spec, cells, lambda table, value: {"model.name": value, "model.latent_dim": 2})
    assert result.verdict == "inconclusive"
    assert result.power.startswith("To support it: about 7 seeds per arm give 80% power")
    assert "`python -m vae_sweeps -m model=mlp3 model.latent_dim=2 seed=3,4,5,6`" in result.power
    assert "`python -m vae_sweeps -m model=mlp2 model.latent_dim=2 seed=3,4,5,6`" in result.power
    # the other way: difference -0.5, interval [-2.77, +1.77], short of the margin: to contradict
    # it, effect 1 - 0.5 = 0.5: n = Z^2 * 2 / 0.25 = 62.8 -> 63 per arm
    cells["x"] = runs("loss", [131.5, 132.5, 133.5], seed=[0, 1, 2])
    assert checked(spec, cells).power.startswith("To contradict it: about 63 seeds per arm")


def test_a_zero_variance_baseline_in_the_same_cell():
    # claim 7: k-NN on the latent means against the PCA-2 baseline, the same for every seed.
    # se = sqrt(0.0004 / 3) = 0.011547, df = n_a - 1 = 2, t(0.975, 2) = 4.302653
    cell = runs("knn_accuracy", [0.80, 0.82, 0.84], **{"metrics.test/knn_accuracy_pca2": [0.70] * 3})
    spec = {"test": "higher", "metric": "knn_accuracy", "metric_b": "knn_accuracy_pca2", "a": ["t", 2],
            "margin": "share"}
    result = checked(spec, {"t": cell})
    assert result.verdict == "supported" and "df 2" in result.evidence and "(n = 3)" in result.evidence
    diff, low, high = claims.welch(cell["metrics.test/knn_accuracy"].to_numpy(), cell.iloc[:, 1].to_numpy())
    assert diff == pytest.approx(0.12) and low == pytest.approx(0.12 - 4.302653 * 0.011547, abs=1e-6)
    # one-sided p at df 2 in closed form: 1/2 - t / (2 sqrt(t^2 + 2)), t = (0.12 - 0.01) / se
    t = 0.11 / 0.0115470
    assert result.p_value == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), rel=1e-4)


def test_a_metric_with_a_slash_is_a_runs_own_column():
    group = pd.DataFrame({"metrics.val/loss_fluctuation": [0.5, 0.7], "metrics.test/loss": [140.0, 141]})
    assert claims._values(group, "val/loss_fluctuation").tolist() == [0.5, 0.7]
    assert claims._values(group, "loss").tolist() == [140.0, 141]
    assert claims._values(group, "recon").size == 0


def shares(table: dict[int, list[float]], n: int = 5) -> pd.DataFrame:
    """drawn_share_<k> per seed: the given digits, 0.05 for the others."""
    return pd.DataFrame({f"metrics.test/drawn_share_{k}": table.get(k, [0.05] * n) for k in range(10)})


SIX = {"test": "all_of", "parts": [
    {"test": "drawn", "a": ["dim1", 1], "digits": [4, 5, 7], "expect": "rarely", "label": "latent dim 1"},
    {"test": "drawn", "a": ["dim2", 2], "digits": list(range(10)), "expect": "every", "label": "latent dim 2"}]}


def test_which_digits_a_decoder_draws_is_graded_per_digit():
    cells = {"dim1": shares({4: [0.000, 0.003, 0.000, 0.001, 0.000], 5: [0.0] * 5, 7: [0.12, 0.15, 0.20, 0.18, 0.13]}),
             "dim2": shares({})}
    result = checked(SIX, cells)
    dim1, dim2 = result.parts
    assert dim1.verdict == "partly supported" and dim2.verdict == "supported"
    assert dim1.why == ("4 and 5 are rarely drawn at latent dim 1 (shares at most 0.003); "
                        "7 is drawn by every seed (shares 0.12-0.20)")
    assert "4: 0.000 0.003 0.000 0.001 0.000" in dim1.evidence
    assert dim2.why == "every digit is drawn by every seed at latent dim 2 (shares 0.05-0.05)"
    # the whole claim: its parts' reasons as sentences, no label of a part
    assert result.verdict == "partly supported" and result.why == f"{dim1.why}; {dim2.why}"
    assert "contradicted in" not in result.why and result.p_value is None
    # every listed digit rare: supported; every one drawn by every seed: contradicted
    cells["dim1"] = shares({4: [0.0] * 5, 5: [0.0] * 5, 7: [0.005] * 5})
    assert checked(SIX, cells).verdict == "supported"
    cells["dim1"] = shares({})
    assert checked(SIX["parts"][0], cells).verdict == "contradicted"
    # some seeds only, and a digit that dim 2 does not draw at all
    cells["dim1"] = shares({4: [0.0] * 5, 5: [0.0] * 5, 7: [0.0, 0.03, 0.0, 0.02, 0.0]})
    assert checked(SIX["parts"][0], cells).why.endswith("; 7 is drawn by 2 of 5 seeds (shares 0.00-0.03)")
    cells["dim2"] = shares({4: [0.0, 0.02, 0.03, 0.02, 0.02], 5: [0.0] * 5})
    dim2 = checked(SIX["parts"][1], cells)
    assert dim2.verdict == "partly supported"
    assert dim2.why == ("0, 1, 2, 3, 6, 7, 8 and 9 are drawn by every seed at latent dim 2 (shares 0.05-0.05); "
                        "4 is drawn by 4 of 5 seeds (shares 0.00-0.03); 5 is rarely drawn (shares at most 0.000)")


def test_runs_without_drawn_shares_say_what_fills_them():
    cells = {"dim1": pd.DataFrame({"metrics.test/loss": [1.0, 2.0]}), "dim2": shares({})}
    result = checked(SIX["parts"][0], cells)
    assert result.verdict == "inconclusive" and "python -m vae_sweeps.backfill" in result.why


@pytest.mark.parametrize("parts, whole", [
    (["supported", "supported"], "supported"),
    (["supported", "partly supported"], "partly supported"),
    (["supported", "contradicted"], "partly supported"),
    (["supported", "inconclusive"], "partly supported"),
    (["contradicted", "contradicted"], "contradicted"),
    (["contradicted", "inconclusive"], "contradicted"),
    (["inconclusive", "inconclusive"], "inconclusive"),
])
def test_a_compound_claims_verdict(parts, whole):
    assert claims.combine(parts) == whole


def test_a_claim_without_runs_says_which_experiment_fills_it():
    experiments = {"table1": "table1", "priors_z2": "priors", "table3": "table3", "table2": "table2",
                   "priors_z10": "priors", "table1_tuned": "table1_tuned"}
    every = claims.checked_claims(lambda table, value: pd.DataFrame(), experiments)
    assert {v.verdict for _, v in every} == {"inconclusive"}
    assert {spec["id"]: v for spec, v in every}["1-tuned"].missing == ["table1_tuned"]
    assert claims.markdown(every).startswith("Adjusted: Holm-Bonferroni over the 24 interval tests")
    # the report leaves out the claims on a tuned table without runs, of the family too
    checked_ = claims.checked_claims(lambda table, value: pd.DataFrame(), experiments, left_out={"table1_tuned"})
    by_id = {spec["id"]: verdict for spec, verdict in checked_}
    assert len(by_id) == len(every) - 3 and not [i for i in by_id if i.endswith("-tuned")]
    assert {v.verdict for v in by_id.values()} == {"inconclusive"}
    assert {v.adjusted for v in by_id.values()} == {"inconclusive"}
    assert by_id["1"].missing == ["table1"] and by_id["8"].missing == ["priors"]
    text = claims.markdown(checked_)
    assert "python -m vae_sweeps experiment=priors" in text
    assert text.startswith("Adjusted: Holm-Bonferroni over the 21 interval tests of this family at one-sided 2.5%; "
                           "a verdict that does not survive it reads inconclusive. The graded tests of claim 6 "
                           "are no interval tests and lie outside the family.")
    assert ", Holm-adjusted **inconclusive**" in claims.headline(*checked_[0])
    assert list(claims.table(checked_).columns) == ["id", "claim", "verdict", "adjusted", "why", "beyond_zero",
                                                    "p_value", "power", "evidence", "fill"]


def test_every_claim_names_cells_that_the_tables_define():
    tables = yaml.safe_load(TABLES_FILE.read_text())["tables"]
    specs = yaml.safe_load(claims.CLAIMS_FILE.read_text())["claims"]
    assert [s["id"] for s in specs][:9] == ["1", "2", "3", "4", "5", "6", "7", "8", "8b"]
    for spec in specs:
        for part in spec.get("parts", [spec]):
            assert part["test"] in claims.TESTS, spec["id"]
            for side in ("a", "b"):
                table, value = part.get(side, part["a"])
                assert cell_key(value) in {cell_key(v) for v in tables[table]["values"]}, (spec["id"], side)
    assert claims.tables_of(next(s for s in specs if s["id"] == "7")) == ["table3"]


def test_every_margin_comes_from_its_kind_with_a_reason():
    rules = claims.load()
    assert all(m["reason"] and m["value"] >= 0 for m in rules["margins"].values())
    assert rules["margins"]["nats"]["value"] == 1.0 and rules["margins"]["share"]["value"] == 0.01
    assert rules["drawn_threshold"]["reason"]
    for spec in rules["claims"]:
        for part in spec.get("parts", [spec]):
            if part["test"] in claims.INTERVAL_TESTS:
                assert part["margin"] in rules["margins"], spec["id"]
    assert claims.family_size(rules["claims"]) == 24  # 21, and the tuned claims' 3 once their table has runs


def test_the_tuned_claims_are_claims_1_to_3_on_table_1_tuned_each_with_a_reason():
    specs = {s["id"]: s for s in claims.load()["claims"]}
    for i in ("1", "2", "3"):
        tuned = specs[f"{i}-tuned"]
        assert tuned["reason"] and claims.tables_of(tuned) == ["table1_tuned"]
        assert {**tuned, "a": specs[i]["a"], "b": specs[i]["b"]} == {
            **specs[i], "id": f"{i}-tuned", "claim": tuned["claim"], "reason": tuned["reason"]}
        assert [tuned[side][1] for side in "ab"] == [specs[i][side][1] for side in "ab"]


def test_the_studys_idea_and_our_variants():
    specs = {s["id"]: s for s in claims.load()["claims"]}
    assert specs["8"]["a"] == ["priors_z2", ["gmm", "bound"]] and specs["8b"]["a"] == ["priors_z10", ["gmm", "bound"]]
    ids = [s["id"] for s in claims.load()["claims"]]
    assert ids[9:13] == ["8-tight", "8-mc", "8b-tight", "8b-mc"]
    assert all(specs[i]["claim"].startswith("Ours, not the study's") for i in ids[9:13])
    assert specs["2"]["test"] == "equivalent" and specs["C3"]["metric"] == "val/loss_fluctuation"
