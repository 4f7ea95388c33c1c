"""The MLflow UI in a real browser: `make ui` on a store with one run, the link it prints
loaded in headless Chromium (Debian's chromium and chromium-driver; nothing downloads a
browser). Skipped where they are not installed."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, compose_tiny, tmp_store

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from vae_sweeps.train import train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no Chromium and chromedriver on this machine (Debian: apt-get install chromium chromium-driver)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1000")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # the process or thread has just ended
        return ""


def descendants(pid: int) -> list[str]:
    """The command lines of the processes under ``pid`` (Linux's /proc; each of its threads
    lists the children it started)."""
    found = []
    for child in (child for task in Path(f"/proc/{pid}/task").glob("*") for child in read(task / "children").split()):
        found += [read(Path(f"/proc/{child}/cmdline")).replace("\0", " "), *descendants(int(child))]
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_root):
    """(the link `make ui` prints, the run, the make process): `make ui` on a store that holds
    one tiny run."""
    tmp_path = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run_id = train(compose_tiny(tmp_path, tiny_root, "trainer.max_epochs=1", "eval.iw_samples=2"))["run_id"]
    run = tmp_store(tmp_path).get_run(run_id)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            ["make", "-C", str(ROOT), "ui", f"PY={sys.executable}", f"PORT={port}",
             f"BACKEND=sqlite:///{tmp_path}/mlruns/mlflow.db", f"ARTIFACTS={tmp_path}/mlruns/artifacts",
             "SERVER_ARGS=--workers 1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"make ui ended: {log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.read() == b"OK":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "make ui's server did not answer within 180 s"
            time.sleep(1)
        printed = [line for line in log_path.read_text().splitlines() if line.startswith("Runs: http://")]
        assert printed, log_path.read_text()[-3000:]
        yield printed[0].split()[1], run, server.pid
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # make, mlflow server and its workers
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def browser(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):  # a new, empty profile
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_printed_link_opens_the_runs_table(server, browser, tmp_path):
    link, run, make = server
    # MLflow 3.17 opens an experiment as its sidebar's GenAI / Model training switch says (kept
    # per browser, GenAI in a new one), whatever the experiment's kind tag: the link says which.
    browser.get(link)
    row = f"//a[contains(., '{run.info.run_name}')]"
    WebDriverWait(browser, 120).until(lambda page: page.find_elements(By.XPATH, row))
    browser.save_screenshot(str(tmp_path / "runs.png"))  # kept in pytest's tmp folder to look at
    assert f"/experiments/{run.info.experiment_id}/runs" in browser.current_url
    assert "traces" not in browser.current_url and "overview" not in browser.current_url
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "MNIST (" in page  # the Dataset column: the dataset input's name and digest
    # MLflow's job runners (GenAI features) are not started: they would cost six processes.
    assert not [command for command in descendants(make) if "huey" in command]
