"""The worked example in examples/: a model, a dataset and a prior from a user's own package
(examples/my_vae/), each selected by one config file in examples/conf/ through Hydra's
--config-dir, then checked, trained, tracked and refused like the built-in options."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import JOB_THREADS, all_runs, job_env
from vae_sweeps import identity, options
from vae_sweeps.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
USER_OPTIONS = ("model=resmlp", "data=npz_images", "prior=laplace")


def example_cli(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``PYTHONPATH=examples python -m vae_sweeps --config-dir examples/conf <args>`` in tmp_path,
    into the tmp store, as examples/README.md runs it."""
    env = job_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "vae_sweeps", "--config-dir", str(EXAMPLES / "conf"), JOB_THREADS, *args,
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def my_vae(monkeypatch):
    """examples/ on sys.path, as PYTHONPATH=examples puts it for the CLI."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_user_options_train_for_an_epoch_through_the_cli(tmp_path):
    npz = tmp_path / "tiny.npz"  # 96 training images (the last 16 for validation), 32 test images
    made = subprocess.run([sys.executable, str(EXAMPLES / "my_vae" / "make_npz.py"), str(npz),
                           "--train", "96", "--test", "32"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr

    result = example_cli(tmp_path, *USER_OPTIONS, f"data.path={npz}", "data.val_size=16", "data.batch_size=16",
                         "trainer.max_epochs=1", "eval.judge_epochs=1", "eval.iw_samples=2")

    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    # then the settings away from the options' own, too many to spell out: the run's identity
    with identity.project_config(EXAMPLES / "conf"):  # the user's options, as the job composed them
        key = identity.key_of(run.data.params)
    assert run.info.run_name == f"resmlp-bce-z2-c1-laplace-npz_images-s0-{key[:8]}"
    params = run.data.params
    assert (params["model.name"], params["data.name"], params["prior.name"]) == ("resmlp", "npz_images", "laplace")
    assert (params["model.width"], params["model.blocks"], params["prior.scale"]) == ("256", "2", "1.0")
    assert params["data.path"] == str(npz)
    metrics = run.data.metrics
    assert "train/loss" in metrics and "val/loss" in metrics
    assert math.isfinite(metrics["test/loss"])
    assert math.isfinite(metrics["test/log_px"])  # the evaluation, through the prior's log_prob
    assert math.isfinite(metrics["test/kl_exact"])  # the prior's own test metric (LaplacePrior.metrics)
    assert "test/judged_accuracy" in metrics
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["npz_images (tiny.npz)"]

    # the back-fill and the report compose the user's options with their --config-dir, as the job did
    env = job_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES), env.get("PYTHONPATH")]))
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    commands = (["vae_sweeps.backfill", "--dry-run"], ["vae_sweeps.report", "--out", str(tmp_path / "report")])
    done = [subprocess.run([sys.executable, "-m", *command, "--tracking-uri", uri, "--config-dir",
                            str(EXAMPLES / "conf")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            for command in commands]
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
    assert "0 FINISHED run(s) lack metrics of the evaluation." in done[0].stdout  # the Laplace prior's too
    rows = (tmp_path / "report" / "runs.csv").read_text().splitlines()[1:]
    (listed,) = [row for row in rows if run.info.run_id in row]
    assert "resmlp" in listed and "laplace" in listed


def test_a_bad_value_of_a_user_option_is_refused_before_any_run(tmp_path):
    result = example_cli(tmp_path, *USER_OPTIONS, "model.width=0")

    assert result.returncode == 2
    assert "model.width=0 is not allowed" in result.stderr
    assert "Traceback" not in result.stderr
    assert all_runs(tmp_path) == []


@pytest.mark.parametrize("axis, option, settings, given, message", [
    ("model", "resmlp", {"width": 0}, {"image_shape": (1, 28, 28)}, "model.width=0 is not allowed"),
    ("model", "resmlp", {"blocks": -1}, {"image_shape": (1, 28, 28)}, "model.blocks=-1 is not allowed"),
    ("data", "npz_images", {"path": [1]}, {"seed": 0}, "data.path=[1] is not allowed"),
    ("prior", "laplace", {"scale": -1.0}, {"latent_dim": 2}, "prior.scale=-1.0 is not allowed"),
])
def test_user_options_check_their_settings(my_vae, axis, option, settings, given, message):
    config = {**OmegaConf.to_container(OmegaConf.load(EXAMPLES / "conf" / axis / f"{option}.yaml")), **settings}
    with pytest.raises(ConfigError, match=re.escape(message)):
        options.build(axis, config, **given)


def test_user_options_keep_the_axes_contracts(my_vae):
    from my_vae.laplace import LaplacePrior
    from my_vae.resmlp import resmlp

    encoder, decoder = resmlp(latent_dim=3, width=16, blocks=2, image_shape=(1, 28, 28))
    assert encoder(torch.rand(5, 1, 28, 28)).shape == (5, 6)
    assert decoder(torch.randn(5, 3)).shape == (5, 1, 28, 28)

    torch.manual_seed(0)
    prior = LaplacePrior(latent_dim=3, scale=0.5)
    assert prior.sample(7).shape == (7, 3)
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3) * 0.5
    z = mu + torch.randn(20000, 4, 3) * (0.5 * logvar).exp()
    mc = prior.kl(mu.expand_as(z), logvar.expand_as(z), z).mean(0)  # the training's estimate, averaged
    assert torch.allclose(mc, prior.kl_exact(mu, logvar), atol=0.05)


def test_a_missing_npz_file_is_one_paragraph_naming_it(my_vae, tmp_path):
    from my_vae.npz_images import NpzImages

    missing = tmp_path / "mine.npz"
    with pytest.raises(DataError) as caught:
        NpzImages(path=str(missing), batch_size=16, val_size=16).load()
    message = str(caught.value)
    assert str(missing) in message and "does not exist" in message
    assert f"make_npz.py {missing}" in message and "\n" not in message
