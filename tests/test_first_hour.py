"""The first hour of a new user (issue 23): every mistake gets the project's one-line error and
exit status 2 before any run exists, runs of one configuration with other settings can be told
apart, and the silences of a run, a resume and a sweep are filled."""

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
from conftest import ROOT, all_runs, job_env, run_cli
from hydra.core.utils import JobReturn, JobStatus

from hydra_plugins.vae_sweeps_sweeper.study_sweeper import summary
from vae_sweeps import backfill, identity, store, tracking
from vae_sweeps.config import validate
from vae_sweeps.data import ImageDataModule
from vae_sweeps.errors import BadValue, ConfigError, DataError
from vae_sweeps.runs import resume
from vae_sweeps.train import make_trainer, train

# A small model and a short evaluation: the model does not matter here.
QUICK = ("model=mlp2", "model.hidden=[64]", "eval.iw_samples=1", "eval.judge_epochs=1", "trainer.max_epochs=1")


# ---------------------------------------------------------------------------- 1. keys that nothing takes


KEYS_NOTHING_TAKES = [  # (overrides, what the message must say)
    (["+trainer.epochs=1"], "trainer.epochs=1 is not allowed: Lightning's Trainer takes no setting epochs (did you "
                            "mean trainer.max_epochs or trainer.min_epochs?); it takes accelerator, strategy,"),
    (["+trainer.callbacks=[]"], "trainer.callbacks=[] is not allowed: the job sets it itself"),
    (["+trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=1.0 is not allowed: the model steps its "
                                         "optimiser itself (manual optimisation"),
    (["+optim.weight_decay=0.01"], "optim.weight_decay=0.01 is not allowed: optim takes no setting weight_decay; "
                                   "it takes name, lr (the optimiser is given optim.lr alone"),
    (["+loss.beta=2"], "loss.beta=2 is not allowed: loss takes no setting beta; it takes name, c"),
    (["+model.width=3"], "model.width=3 is not allowed: model=mlp3 (vae_sweeps.models.mlp) takes no setting width; "
                         "it takes latent_dim, hidden, layers (the job gives image_shape)."),
    (["prior=gmm", "+prior.component=3"], "prior.component=3 is not allowed: prior=gmm "
                                          "(vae_sweeps.priors.MixturePrior) takes no setting component (did you "
                                          "mean prior.components?); it takes components, kl (the job gives "
                                          "latent_dim)."),
]


@pytest.mark.parametrize("overrides, message", KEYS_NOTHING_TAKES, ids=[" ".join(o) for o, _ in KEYS_NOTHING_TAKES])
def test_a_key_that_nothing_takes_is_refused_before_a_run_exists(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*overrides))  # the job's first step (__main__.main)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert all_runs(tmp_path) == [] and not (tmp_path / "out").exists()


def test_the_keys_a_trainer_takes_pass(make_cfg):
    validate(make_cfg("+trainer.max_time=00:01:00:00", "+trainer.gradient_clip_val=null", "trainer.devices=1"))


def test_cli_following_hydras_hint_for_an_unknown_trainer_key(tmp_path, tiny_root):
    done = run_cli(tmp_path, tiny_root, "+trainer.epochs=1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: trainer.epochs=1 is not allowed: Lightning's Trainer takes no setting epochs")
    assert "Traceback" not in done.stderr + done.stdout
    assert all_runs(tmp_path) == []


# ---------------------------------------------------------------------------- 2. Hydra's refusals


HYDRA_REFUSALS = [  # (arguments, the one line on stderr)
    (["model=resnet"], "error: model=resnet is not allowed: choose one of cnn, mlp2, mlp3, mlp4 (the options of "
                       "the config group model, as --help lists them), e.g. model=cnn."),
    (["trainer.epochs=1"], "error: trainer.epochs is not a key of the config (did you mean trainer.max_epochs?); "
                           "trainer has max_epochs, accelerator, devices, precision, enable_progress_bar, "
                           "enable_model_summary. A key that is not in the config takes a + (+trainer.epochs=1), "
                           "and is then checked against what reads it."),
    (["-m", "model=mlp2,", "mlp3"], "error: the override 'model=mlp2,' cannot be read (mismatched input '<EOF>'): "
                                    "write key=value, and for a sweep -m key=a,b,c without spaces (or quoted: "
                                    "'key=a, b'), e.g. -m model=mlp2,mlp3 (Hydra's override grammar: "
                                    "https://hydra.cc/docs/advanced/override_grammar/basic/)."),
    (["model=mlp3,cnn"], "error: Ambiguous value for argument 'model=mlp3,cnn' 1. To use it as a list, use "
                         "key=[value1,value2] 2. To use it as string, quote the value: key=\\'value1,value2\\' 3. To "
                         "sweep over it, add --multirun to your command line (Hydra's refusal of the command line)."),
]


@pytest.mark.parametrize("args, line", HYDRA_REFUSALS, ids=[" ".join(a) for a, _ in HYDRA_REFUSALS])
def test_cli_hydras_refusals_are_one_line_and_exit_2(tmp_path, args, line):
    done = subprocess.run([sys.executable, "-m", "vae_sweeps", *args], cwd=tmp_path, env=job_env(),
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr.strip(), done.stdout) == (2, line, "")
    assert not (tmp_path / "outputs").exists()


def test_cli_a_crash_in_a_run_still_exits_1_with_its_traceback(tmp_path, tiny_root):
    done = run_cli(tmp_path, tiny_root, *QUICK, "loss.c=1e38")  # c * Recon overflows at the first step
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" in done.stderr and "NonFiniteLoss: train/loss is inf" in done.stderr
    assert [r.info.status for r in all_runs(tmp_path)] == ["FAILED"]


# ---------------------------------------------------------------------------- 3. the data root


def test_a_data_root_that_is_not_there_is_refused_and_not_made(tmp_path):
    missing = tmp_path / "no" / "datasets"
    with pytest.raises(BadValue, match=re.escape(f"root='{missing}' is not allowed: there is no such folder; give "
                                                 "the one that holds MNIST/raw/")) as err:
        ImageDataModule("mnist", str(missing), download=True)
    assert f"or make it first (mkdir -p {missing}) for the files to be downloaded into it" in str(err.value)
    assert not (tmp_path / "no").exists()


def test_the_default_data_root_may_be_made_for_a_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ImageDataModule("mnist", "data", download=True)  # the first run on a machine with internet downloads here
    assert not (tmp_path / "data").exists()  # made by the download, not before


def test_a_missing_data_root_is_refused_before_a_run(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"data.root='{tmp_path}/nonexistent' is not allowed: there is "
                                                    "no such folder")):
        validate(make_cfg(f"data.root={tmp_path}/nonexistent", "data.download=true"))
    assert all_runs(tmp_path) == [] and not (tmp_path / "nonexistent").exists()
    with pytest.raises(DataError, match=re.escape(f"missing from {tmp_path}/nonexistent/MNIST/raw. Downloading is "
                                                  "off (data.download=false)")):
        train(make_cfg(f"data.root={tmp_path}/nonexistent"))  # nothing would be made
    assert all_runs(tmp_path) == [] and not (tmp_path / "nonexistent").exists()


# ---------------------------------------------------------------------------- 4. a model too large


def test_a_model_too_large_names_the_setting_that_makes_it_so(make_cfg):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg("model.hidden=[100000,100000]"))
    message = str(err.value)
    assert message.startswith("model.hidden=[100000, 100000] with model.latent_dim=2 is not allowed: this mlp3 would "
                              "have 20,157,800,788 parameters")
    assert message.endswith("choose smaller sizes, e.g. model.hidden=[1024, 512] (mlp3's own).")
    with pytest.raises(ConfigError, match=r"e\.g\. prior\.components=10 \(gmm's own\)\.$"):
        validate(make_cfg("prior=gmm", "prior.components=1000000000"))


# ---------------------------------------------------------------------------- 5. run names


def test_every_setting_away_from_its_default_shows_in_the_run_name(tmp_path, tiny_root):
    default = identity.compose(["paths.output_dir=."])
    assert identity.run_name(default) == "mlp3-bce-z2-c1-mnist-s0"  # as before
    assert identity.run_name(identity.compose(["paths.output_dir=.", "threads=1", "seed=2"])) == \
        "mlp3-bce-z2-c1-mnist-s2"  # threads changes no result
    one_epoch = identity.compose(["paths.output_dir=.", "trainer.max_epochs=1"])
    assert identity.run_name(one_epoch) == "mlp3-bce-z2-c1-mnist-s0-max_epochs=1"
    # too many to spell out: the run's identity, and the caption lists them
    many = identity.compose(["paths.output_dir=.", "trainer.max_epochs=4", "model.hidden=[512,256]",
                             "eval.iw_samples=10"])
    assert identity.run_name(many) == f"mlp3-bce-z2-c1-mnist-s0-{identity.run_key(many)[:8]}"
    assert identity.caption(many, "0123456789") == (
        "mlp3 | bce | latent dim 2 | c = 1 | prior standard | mnist | seed 0 | 4 epochs | "
        "model.hidden=[512, 256] | eval.iw_samples=10 | run 01234567")


# ---------------------------------------------------------------------------- 6. a kill before the first checkpoint


def test_a_run_killed_before_its_first_checkpoint_says_why_it_trains_anew(make_cfg, tmp_path, caplog):
    cfg = make_cfg()
    validate(cfg)
    client, experiment_id = store.open_store(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "vae_sweeps")
    killed = tracking.start_run(client, experiment_id, tmp_path / "earlier", identity.run_name(cfg),
                                identity.params(cfg), tracking.config_yaml(cfg))
    client.set_terminated(killed, "KILLED")
    with caplog.at_level(logging.WARNING, logger="vae_sweeps.runs"):
        run_id, epochs = resume(client, experiment_id, identity.run_key(cfg), tmp_path / "out")
    assert (run_id, epochs) == (None, 0)  # a new run starts
    assert f"No checkpoint was saved before the stop: training anew; the KILLED run {killed} stays" in caplog.text
    assert client.get_run(killed).info.status == "KILLED"


# ---------------------------------------------------------------------------- 7, 9, 10. a sweep, a skip, its lines


def test_cli_a_sweep_is_named_by_its_folder_and_ends_with_a_summary(make_cfg, tmp_path, tiny_root):
    train(make_cfg(*QUICK))  # seed 0 is FINISHED: the sweep skips it
    done = run_cli(tmp_path, tiny_root, *QUICK, "seed=0,1", flags=("-m",))
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = (tmp_path / "outputs" / "multirun").iterdir()
    run = next(r for r in all_runs(tmp_path) if r.data.params["seed"] == "1")
    assert run.data.tags["sweep_id"] == folder.name
    assert f"Sweep {folder.name}: 1 trained, 1 skipped, 0 failed (logs in {folder.resolve()})" in done.stdout
    # no progress bar here: a line per epoch instead
    assert re.search(r"epoch 1 of 1, train/loss [\d.]+, val/loss [\d.]+ \([\d.]+ s\)", done.stdout), done.stdout[-2000:]

    again = run_cli(tmp_path, tiny_root, *QUICK, "seed=1")  # one skipped job says so once
    assert again.returncode == 0, again.stderr[-2000:]
    said = again.stdout + again.stderr
    assert said.count("Skipped") == 1 and f"this configuration already has a FINISHED run ({run.info.run_id}" in said


def test_the_summary_counts_jobs_that_were_skipped_when_they_started(tmp_path):
    def job(status, value=None):
        return JobReturn(overrides=[], status=status, _return_value=value)

    returns = [job(JobStatus.COMPLETED, {"run_id": "a", "test/loss": 1.0}),
               job(JobStatus.COMPLETED, {"run_id": "b", "skipped": "this configuration has a RUNNING run"}),
               job(JobStatus.FAILED, RuntimeError("boom"))]
    folder = tmp_path / "2026-12-06_08-17-06-7b1ba6"
    assert summary(returns, 2, folder) == (
        f"Sweep 2026-12-06_08-17-06-7b1ba6: 1 trained, 3 skipped, 1 failed (logs in {folder})")


# ---------------------------------------------------------------------------- 8. a filter that matches nothing


@pytest.fixture
def finished_store(make_cfg, tmp_path):
    """A store with one FINISHED run of the default mlp3 (its params only) and its URI."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client, experiment_id = store.open_store(uri, "vae_sweeps")
    cfg = make_cfg()
    validate(cfg)
    started = tracking.start_run(client, experiment_id, tmp_path / "out", identity.run_name(cfg),
                                 identity.params(cfg), tracking.config_yaml(cfg))
    client.set_terminated(started, "FINISHED")
    return uri


def test_backfill_a_filter_key_that_is_not_a_param_exits_2(finished_store, capsys):
    with pytest.raises(SystemExit) as exit_:
        backfill.main(["model.nmae=mlp3", "--tracking-uri", finished_store, "--dry-run"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.nmae is not a param of any run (did you mean model.name?): filters are KEY=VALUE params, as the "
        "MLflow runs show them, e.g. model.name=mlp3 seed=0.")


def test_backfill_a_filter_that_matches_no_run_says_so(finished_store, capsys):
    with pytest.raises(SystemExit) as exit_:
        backfill.main(["model.name=mlp5", "seed=0", "--tracking-uri", finished_store, "--dry-run"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == (
        "error: No FINISHED run of experiment 'vae_sweeps' matches model.name=mlp5 seed=0: none has model.name=mlp5 "
        "(the runs have mlp3).")
    assert backfill.backfill(finished_store, "vae_sweeps", {"model.name": "mlp3"}, "data", dry_run=True) == 1


# ---------------------------------------------------------------------------- 9. --help


def test_cli_help_names_the_program_as_it_is_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vae_sweeps", "--help"], cwd=tmp_path, env=job_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("python -m vae_sweeps [-m] [group=option ...]")
    assert "__main__" not in done.stdout


# ---------------------------------------------------------------------------- 10. SLURM's hint


@pytest.mark.parametrize("under_slurm", [False, True], ids=["here", "in a SLURM job"])
def test_the_srun_hint_only_in_a_slurm_job(make_cfg, tmp_path, monkeypatch, under_slurm):
    srun = tmp_path / "bin" / "srun"  # SLURM installed on this machine
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    if under_slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "41")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(make_cfg(), [], tmp_path)
    hints = [w for w in caught if "The `srun` command is available" in str(w.message)]
    assert bool(hints) == under_slurm


# ---------------------------------------------------------------------------- 11. a CPU-only install


def test_a_cpu_only_install_of_the_pinned_pair():
    cpu = "torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"
    assert f'make install TORCH="{cpu}"' in (ROOT / "README.md").read_text()
    planned = subprocess.run(["make", "-n", "install", f"TORCH={cpu}"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert f"-m pip install {cpu}\n" in planned
