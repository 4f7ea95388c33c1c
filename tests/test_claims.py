"""The study's claims as data (experiments/claims.yaml) and their verdicts from intervals."""

import pandas as pd
import pytest
import yaml

from vae_sweeps import claims
from vae_sweeps.tables import TABLES_FILE, cell_key


def runs(metric: str, values, **columns) -> pd.DataFrame:
    return pd.DataFrame({f"metrics.test/{metric}": values, **columns})


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
    result = claims.check({"test": "lower", "metric": "loss", "a": ["x", 1], "b": ["y", 1], "margin": 1.0},
                          lambda table, value: cells[table])
    assert result.verdict == verdict
    if len(a) == 1:
        assert "too few seeds" in result.why and "n = 1 and 3" in result.why


def test_not_lower_is_supported_by_an_interval_above_minus_the_margin():
    cells = {"x": runs("loss", [140.2, 140.9, 141.1]), "y": runs("loss", [140.0, 141, 142])}
    spec = {"test": "not_lower", "metric": "loss", "a": ["x", 1], "b": ["y", 1], "margin": 5.0}
    assert claims.check(spec, lambda t, v: cells[t]).verdict == "supported"
    cells["x"] = runs("loss", [120.0, 121, 122])
    assert claims.check(spec, lambda t, v: cells[t]).verdict == "contradicted"


def test_classes_drawn_and_a_compound_claim():
    cells = {"dim1": pd.DataFrame({"classes_drawn": ["0 1 2 3 6 8 9", "0 1 3 6 9"]}),
             "dim2": pd.DataFrame({"classes_drawn": ["0 1 2 3 4 5 6 7 8 9", "0 1 2 3 4 5 6 7 8 9"]})}
    spec = {"test": "all_of", "parts": [{"test": "draws", "a": ["dim1", 1], "absent": [4, 5, 7], "label": "one"},
                                        {"test": "draws", "a": ["dim2", 2], "at_least": 10, "label": "two"}]}
    result = claims.check(spec, lambda t, v: cells[t])
    assert result.verdict == "supported" and "0 1 3 6 9" in result.evidence
    cells["dim1"] = pd.DataFrame({"classes_drawn": ["0 1 4", "0 1 5"]})
    result = claims.check(spec, lambda t, v: cells[t])
    assert result.verdict == "contradicted" and result.why == "contradicted in: one"


def test_a_claim_without_runs_says_which_experiment_fills_it():
    checked = claims.checked_claims(lambda table, value: pd.DataFrame(),
                                    {"table1": "table1", "priors_z2": "priors", "table3": "table3", "table2": "table2",
                                     "priors_z10": "priors"})
    by_id = {spec["id"]: verdict for spec, verdict in checked}
    assert {v.verdict for v in by_id.values()} == {"inconclusive"}
    assert by_id["1"].missing == ["table1"] and by_id["8"].missing == ["priors"]
    assert "python -m vae_sweeps experiment=priors" in claims.markdown(checked)


def test_every_claim_names_cells_that_the_tables_define():
    tables = yaml.safe_load(TABLES_FILE.read_text())["tables"]
    specs = yaml.safe_load(claims.CLAIMS_FILE.read_text())["claims"]
    assert [s["id"] for s in specs][:9] == ["1", "2", "3", "4", "5", "6", "7", "8", "8b"]
    for spec in specs:
        for part in spec.get("parts", [spec]):
            assert part["test"] in claims.TESTS, spec["id"]
            for side in ("a", "b"):
                if side in part:
                    table, value = part[side]
                    assert cell_key(value) in {cell_key(v) for v in tables[table]["values"]}, (spec["id"], side)
