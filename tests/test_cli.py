"""The command line: bad input is refused before training, and a multirun tracks every job."""

import http.server
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest
from conftest import all_runs, job_env, run_cli, tmp_store, tiny_overrides

from vae_sweeps.config import validate
from vae_sweeps.errors import ConfigError, DataError, UserError
from vae_sweeps.store import check_reachable
from vae_sweeps.train import train

BAD_INPUT = [  # (overrides, what the message must say)
    (["model.name=resnet"], "model.name='resnet' is not allowed: choose one of cnn, mlp2, mlp3, mlp4"),
    (["model.latent_dim=0"], "model.latent_dim=0 is not allowed: it must be a positive integer"),
    (["model.latent_dim=-3"], "model.latent_dim=-3 is not allowed: it must be a positive integer"),
    (["model.latent_dim=2.5"], "model.latent_dim=2.5 is not allowed: it must be a positive integer"),
    (["model.latent_dim=two"], "model.latent_dim='two' is not allowed: it must be a positive integer"),
    (["model=mlp3", "model.hidden=[400]"], "model.hidden=[400] is not allowed: it must be a list of exactly 2"),
    (["model=cnn", "model.channels=[]"], "model.channels=[] is not allowed: it must be a list of at least 1"),
    (["loss.name=huber"], "loss.name='huber' is not allowed: choose one of bce, l1, l2"),
    (["loss.c=0"], "loss.c=0 is not allowed: it must be a finite number > 0"),
    (["loss.c=-1.5"], "loss.c=-1.5 is not allowed: it must be a finite number > 0"),
    (["loss.c=nan"], "loss.c=nan is not allowed: it must be a finite number > 0"),
    (["loss.c=inf"], "loss.c=inf is not allowed: it must be a finite number > 0"),
    (["prior.name=vamp"], "prior.name='vamp' is not allowed: choose one of gmm, none, standard"),
    (["prior=gmm", "prior.components=0"], "prior.components=0 is not allowed: it must be a positive integer"),
    (["prior=gmm", "prior.kl=exact"], "prior.kl='exact' is not allowed: choose one of bound, tight, mc"),
    (["eval.iw_samples=0"], "eval.iw_samples=0 is not allowed: it must be a positive integer"),
    (["data.name=cifar10"], "data.name='cifar10' is not allowed: choose one of fashion_mnist, mnist"),
    (["data.batch_size=0"], "data.batch_size=0 is not allowed: it must be a positive integer"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 is not allowed: it must be a positive integer"),
    (["optim.lr=-0.1"], "optim.lr=-0.1 is not allowed: it must be a finite number > 0"),
    (["seed=-1"], "seed=-1 is not allowed: it must be an integer >= 0"),
    (["eval.knn_k=100000"], "eval.knn_k=100000 is not allowed: it must be at most the number of training images, "
                            "59984 (60000 less data.val_size=16)"),
    (["model.latent_dim=1000000000"], "model.latent_dim=1000000000 with model.hidden=[1024, 512] is not allowed: this "
                                      "mlp3 would have 1,538,002,658,064 parameters, more than 1,000,000,000"),
    (["tracking.uri=ftp://x/y"], "tracking.uri='ftp://x/y' is not allowed: it must be a SQLite database"),
    (["tracking.uri=http://user:secretpw@127.0.0.1:9"], "tracking.uri holds a password in its URI, which would be "
                                                        "saved under outputs/ and printed by MLflow. Give it without "
                                                        "credentials (tracking.uri=http://127.0.0.1:9)"),
    (["tracking.experiment=''"], "tracking.experiment='' is not allowed: it must be a non-empty name"),
]


def checked_and_trained(cfg):
    """A job as it enters (vae_sweeps/__main__.py: main): its config checked, then trained."""
    validate(cfg)
    return train(cfg)


@pytest.fixture
def tracked_run(tmp_path):
    """A store that already holds one FINISHED run, which bad input must leave alone."""
    client = tmp_store(tmp_path)
    experiment = client.create_experiment("vae_sweeps", artifact_location=(tmp_path / "mlruns" / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "test/loss", 140.0)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.mark.parametrize("overrides, message", BAD_INPUT, ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_input_is_refused_before_a_run_starts(make_cfg, tmp_path, tracked_run, overrides, message):
    with pytest.raises(ConfigError) as err:
        checked_and_trained(make_cfg(*overrides))
    assert message in str(err.value)
    runs = all_runs(tmp_path)
    assert [(r.info.run_id, r.info.status, r.data.metrics) for r in runs] == [(tracked_run, "FINISHED", {"test/loss": 140.0})]
    assert not (tmp_path / "out").exists()


def test_a_data_root_that_is_a_file(make_cfg, tmp_path):
    not_a_dir = tmp_path / "datasets.tar"
    not_a_dir.write_text("")
    with pytest.raises(ConfigError, match=f"data.root='{re.escape(str(not_a_dir))}' is not allowed: it must be a directory"):
        checked_and_trained(make_cfg(f"data.root={not_a_dir}"))
    assert all_runs(tmp_path) == []


@contextmanager
def read_only(path):
    """``path`` unwritable for this user; for root, whom permission bits do not stop, through
    the immutable attribute (as on a read-only mount)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i does not work here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("part", ["database", "folder"])
def test_a_read_only_store_is_refused_before_a_run_starts(make_cfg, tmp_path, tracked_run, part):
    db = tmp_path / "mlruns" / "mlflow.db"
    locked = db if part == "database" else db.parent
    with read_only(locked), pytest.raises(UserError) as err:
        train(make_cfg())
    message = str(err.value)
    assert f"The MLflow store {db} is read-only: this user cannot write {locked}" in message
    assert "tracking.uri=" in message and "\n" not in message
    assert [(r.info.run_id, r.info.status) for r in all_runs(tmp_path)] == [(tracked_run, "FINISHED")]


def test_cli_prints_one_paragraph_and_exits_2(tmp_path, tiny_root):
    done = run_cli(tmp_path, tiny_root, "loss.c=-1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: loss.c=-1 is not allowed: it must be a finite number > 0, e.g. loss.c=1.0.")
    assert "Traceback" not in done.stderr + done.stdout
    assert all_runs(tmp_path) == []


def test_missing_data_says_where_it_looked(make_cfg, tmp_path):
    # (the CLI prints a DataError as it prints any UserError: test_cli_prints_one_paragraph_and_exits_2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        train(make_cfg(f"data.root={empty}", "data=fashion_mnist"))
    message = str(err.value)
    assert f"are missing from {empty}/FashionMNIST/raw" in message
    assert "VAE_SWEEPS_DATA_DIR" in message and "\n" not in message
    assert all_runs(tmp_path) == []


def test_a_gzip_file_damaged_near_its_start_is_one_paragraph(make_cfg, tmp_path, tiny_root):
    raw = tmp_path / "datasets" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (tiny_root / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(gz, raw)
    damaged = raw / "train-images-idx3-ubyte.gz"
    packed = damaged.read_bytes()
    damaged.write_bytes(packed[:30] + bytes(len(packed) - 30))  # zeros from byte 30 on
    with pytest.raises(DataError) as err:
        train(make_cfg(f"data.root={tmp_path / 'datasets'}"))
    assert str(err.value).startswith(f"{damaged} is a damaged gzip file") and "\n" not in str(err.value)
    assert all_runs(tmp_path) == []


@pytest.mark.parametrize("flags", [(), ("-m",)], ids=["run", "sweep"])
def test_cli_an_unreachable_tracking_server_is_one_paragraph(tmp_path, tiny_root, flags):
    done = run_cli(tmp_path, tiny_root, "tracking.uri=http://127.0.0.1:9", flags=flags, timeout=120)  # nothing listens
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: The MLflow tracking server at http://127.0.0.1:9 does not answer")
    assert "make server" in last and "sqlite:///mlruns/mlflow.db" in last
    assert "Traceback" not in done.stderr + done.stdout


def test_any_answer_from_a_tracking_server_counts():
    """A server that answers /health with an error (an auth proxy, an older server) is there:
    MLflow's own requests say what is wrong with it."""
    class Unsupported(http.server.BaseHTTPRequestHandler):  # answers 501 to every request
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unsupported)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_address[1]}/prefix")
    finally:
        server.shutdown()


@pytest.mark.parametrize("where", ["override", "quoted override", "config file", "environment"])
def test_cli_refuses_a_password_in_the_tracking_uri_and_shows_it_nowhere(tmp_path, tiny_root, where):
    uri = "http://user:secretpw@127.0.0.1:9"
    env = job_env()
    args = [sys.executable, "-m", "vae_sweeps", *tiny_overrides(tmp_path, tiny_root)]
    if where == "override":
        args.append(f"tracking.uri={uri}")
    elif where == "quoted override":  # as a shell passes tracking.uri="'http://...'"
        args.append(f"tracking.uri='{uri}'")
    elif where == "config file":  # a team's experiment config in the user's own config folder
        (tmp_path / "team" / "experiment").mkdir(parents=True)
        (tmp_path / "team" / "experiment" / "team.yaml").write_text(
            f"# @package _global_\ntracking:\n  uri: {uri}\n")
        args = [arg for arg in args if not arg.startswith("tracking.uri=")]  # the file's URI, then
        args[3:3] = ["--config-dir", str(tmp_path / "team")]
        args.append("experiment=team")
    else:
        env["MLFLOW_TRACKING_URI"] = uri
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in done.stderr
    assert "secretpw" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    written = [path for path in tmp_path.rglob("*") if path.is_file() and b"secretpw" in path.read_bytes()]
    assert written == ([tmp_path / "team" / "experiment" / "team.yaml"] if where == "config file" else [])


def test_cli_unknown_config_group_option_lists_the_allowed_ones(tmp_path, tiny_root):
    done = run_cli(tmp_path, tiny_root, "model=resnet")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: model=resnet is not allowed: choose one of cnn, mlp2, mlp3, mlp4 (the options "
                                   "of the config group model, as --help lists them), e.g. model=cnn.")
    assert all_runs(tmp_path) == []


def test_multirun_tracks_each_job_with_one_sweep_id(tmp_path, tiny_root):
    done = run_cli(tmp_path, tiny_root, "model=mlp2,cnn", "trainer.max_epochs=1", flags=("-m",))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = all_runs(tmp_path)
    assert sorted(r.data.params["model.name"] for r in runs) == ["cnn", "mlp2"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    sweep_ids = {r.data.tags.get("sweep_id") for r in runs}
    assert len(sweep_ids) == 1 and None not in sweep_ids
    # both runs name the command that launched them (the report lists these)
    command = shlex.join(["python", "-m", "vae_sweeps", "-m", *tiny_overrides(tmp_path, tiny_root),
                          "model=mlp2,cnn", "trainer.max_epochs=1"])
    assert {r.data.tags.get("command") for r in runs} == {command}
    # each job printed its own run id, and wrote its outputs under outputs/multirun/<time>/<job>
    printed = set(re.findall(r"MLflow run id: (\w+)", done.stdout))
    assert printed == {r.info.run_id for r in runs}
    job_dirs = [p for p in (tmp_path / "outputs" / "multirun").glob("*/*") if p.is_dir()]
    assert sorted(p.name for p in job_dirs) == ["0", "1"]
    assert {r.data.tags["output_dir"] for r in runs} == {str(p) for p in job_dirs}
