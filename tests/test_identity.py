"""One identity of a run: params, result settings and the key that the sweeper's skip, the
resume lookup and the report's grouping share, stable when a setting with a default is added."""

import pytest
from conftest import compose_tiny, run_cli
from mlflow.entities import Metric, Param
from omegaconf import OmegaConf

from vae_sweeps import identity, store
from vae_sweeps.config import validate
from vae_sweeps.report import build_report


def older(params: dict[str, str], *sections: str) -> dict[str, str]:
    """``params`` as a vae_sweeps from before ``sections`` existed would have logged them."""
    return {k: v for k, v in params.items() if not k.startswith(sections)}


@pytest.fixture
def tiny_cfg(tmp_path, tiny_root, monkeypatch):
    """A tiny job's config, checked as every job's is."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def make(*overrides):
        cfg = compose_tiny(tmp_path, tiny_root, *overrides)
        validate(cfg)
        return cfg

    return make


def test_params_leave_out_paths_secrets_and_force_and_results_leave_out_display(tiny_cfg):
    params = identity.params(tiny_cfg("threads=1"))
    assert params["model.name"] == "mlp3" and params["threads"] == "1" and params["seed"] == "0"
    assert not any(k.startswith(("tracking.", "paths.", "hydra.")) or k in ("force", "data.root") for k in params)
    results = identity.result_settings(params)
    assert "threads" not in results and "trainer.enable_progress_bar" not in results and "data.download" not in results
    assert results["trainer.max_epochs"] == "2"


def test_a_run_from_before_a_setting_existed_is_the_same_run(tiny_cfg):
    cfg = tiny_cfg()
    params = identity.params(cfg)
    assert identity.key_of(older(params, "prior.", "eval.")) == identity.run_key(cfg)
    # but not when the new setting is away from its default
    assert identity.key_of(older(identity.params(tiny_cfg("eval.knn_k=7")), "prior.")) != identity.run_key(cfg)
    assert identity.run_key(tiny_cfg("prior=none")) != identity.run_key(cfg)


def test_the_default_of_a_setting_is_that_of_the_runs_own_option(tiny_cfg):
    cfg = tiny_cfg("prior=gmm")
    params = identity.params(cfg)
    assert params["prior.kl"] == "tight"
    # a mixture-prior run logged before prior.kl existed trained with gmm's default estimator
    assert identity.key_of(older(params, "prior.kl")) == identity.run_key(cfg)
    assert identity.key_of(older(params, "prior.kl")) != identity.run_key(tiny_cfg("prior=gmm", "prior.kl=mc"))
    completed = identity.completed(older(params, "prior.kl", "prior.components"))
    assert completed["prior.kl"] == "tight" and completed["prior.components"] == "10"


def test_what_changes_no_result_changes_no_identity(tiny_cfg):
    key = identity.run_key(tiny_cfg())
    assert identity.run_key(tiny_cfg("threads=1", "trainer.enable_model_summary=true", "force=true")) == key
    assert identity.run_key(tiny_cfg("seed=1")) != key
    assert identity.group_key(identity.params(tiny_cfg("seed=1"))) == identity.group_key(identity.params(tiny_cfg()))
    assert identity.run_key(tiny_cfg("loss.c=1")) == identity.run_key(tiny_cfg("loss.c=1.0")) != \
        identity.run_key(tiny_cfg("loss.c=2"))


def test_equal_settings_are_one_run_whether_or_not_the_config_was_checked(make_cfg):
    for integer, decimal in (("loss.c=1", "loss.c=1.0"), ("loss.c=2", "loss.c=2.0"), ("optim.lr=1", "optim.lr=1.0")):
        unchecked = make_cfg(integer)
        checked = make_cfg(decimal)
        before = OmegaConf.to_yaml(checked)
        validate(checked)
        assert OmegaConf.to_yaml(checked) == before  # the check changes nothing
        assert identity.run_key(unchecked) == identity.run_key(checked)
        assert identity.params(unchecked) == identity.params(checked)
    assert identity.params(make_cfg("loss.c=1"))["loss.c"] == "1.0"  # as runs have always logged it


# Identities and names computed at 10feb7a, before the check stopped writing floats into the
# config: a study's skip of FINISHED runs and its resumes find earlier runs by these keys.
EARLIER_KEYS = [
    ((), "44136fa355b3678a", "mlp3-bce-z2-c1-mnist-s0"),
    (("model=mlp2", "seed=3", "loss=l2", "loss.c=0.5"), "4eee6a824c133c2f", "mlp2-l2-z2-c0.5-mnist-s3"),
    (("loss.c=1",), "44136fa355b3678a", "mlp3-bce-z2-c1-mnist-s0"),
    (("loss.c=2",), "05eabd713bbf4c58", "mlp3-bce-z2-c2-mnist-s0"),
    (("optim.lr=1e-2",), "5a278f7e5a928d01", "mlp3-bce-z2-c1-mnist-s0-lr=0.01"),
    (("optim.lr=1",), "22a0f64129a43cf5", "mlp3-bce-z2-c1-mnist-s0-lr=1.0"),
    (("data=fashion_mnist", "prior=gmm", "prior.kl=mc", "model.latent_dim=5"), "cc5f0ff37847e9eb",
     "mlp3-bce-z5-c1-gmm_mc-fashion_mnist-s0"),
    (("model=cnn", "trainer.max_epochs=1", "seed=1"), "279635c9e2dd1bb2", "cnn-bce-z2-c1-mnist-s1-max_epochs=1"),
]


@pytest.mark.parametrize("overrides, key, name", EARLIER_KEYS,
                         ids=[" ".join(o) or "default" for o, _, _ in EARLIER_KEYS])
def test_run_keys_and_names_are_those_of_earlier_versions(overrides, key, name, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = identity.compose([*overrides, "paths.output_dir=."])
    assert (identity.run_key(cfg), identity.run_name(cfg)) == (key, name)
    validate(cfg)
    assert (identity.run_key(cfg), identity.run_name(cfg)) == (key, name)


def test_names_of_a_run(tiny_cfg):
    # a tiny job's settings away from their defaults (batch and validation size, 2 epochs) show too
    tiny = "batch_size=16,val_size=16,max_epochs=2"
    assert identity.run_name(tiny_cfg("seed=4")) == f"mlp3-bce-z2-c1-mnist-s4-{tiny}"
    assert identity.run_name(tiny_cfg("prior=gmm", "prior.kl=mc", "loss.c=0.5")) == \
        f"mlp3-bce-z2-c0.5-gmm_mc-mnist-s0-{tiny}"
    assert identity.caption(tiny_cfg("prior=gmm"), "0123456789") == (
        "mlp3 | bce | latent dim 2 | c = 1 | prior gmm (components 10, kl tight) | mnist | seed 0 | 2 epochs | "
        "data.batch_size=16 | data.val_size=16 | run 01234567")


def test_a_store_from_an_older_version_is_skipped_by_a_sweep_and_counted_once(tmp_path, tiny_root, tiny_cfg):
    """A FINISHED run logged before the prior and eval settings existed, with a config_hash of
    the old formula, beside one logged today: a sweep over both configurations skips both, and
    the report counts them in one cell."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client, experiment_id = store.open_store(uri, "vae_sweeps")

    def finished_run(params: dict[str, str], tags: dict[str, str]) -> str:
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(f"test/{k}", v, 0, 2) for k, v in (("loss", 150.0), ("recon", 143.0), ("kl", 7.0))])
        client.set_terminated(run_id, "FINISHED")
        return run_id

    old = finished_run(older(identity.params(tiny_cfg()), "prior.", "eval."),
                       {"config_hash": "0123456789abcdef"})  # the old formula's
    new = finished_run(identity.params(tiny_cfg("seed=1")), {"config_hash": identity.run_key(tiny_cfg("seed=1"))})

    done = run_cli(tmp_path, tiny_root, "seed=0,1", flags=("-m",))
    assert done.returncode == 0, done.stderr
    assert "Skipping 2 of 2 job(s) that already have a FINISHED run" in done.stdout
    assert "0 job(s) to run" in done.stdout and len(client.search_runs([experiment_id])) == 2

    built = build_report(client, "vae_sweeps", tmp_path / "report")
    row = built["tables"]["table1"].set_index("model.name").loc["mlp3"]
    assert row["n"] == 2 and row["seeds"] == "0 1" and set(row["run_ids"].split()) == {old, new}
