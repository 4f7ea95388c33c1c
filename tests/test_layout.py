"""The package's layout keeps its promises: imports stack at most 5 layers, nothing outside
priors.py names a particular prior, and checking a config loads no Lightning (importing the
modules that check it, and calling the check), and importing a module registers no resolver."""

import ast
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vae_sweeps"


def package_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports at module level."""
    modules = {path.stem: path for path in PACKAGE.glob("*.py")}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vae_sweeps":
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vae_sweeps.")}
        imports[name] = found - {name}
    return imports


def test_imports_stack_at_most_five_layers():
    imports = package_imports()

    @functools.lru_cache(maxsize=None)
    def layer(name: str) -> int:  # a module sits one layer above the highest module it imports
        return 1 + max((layer(other) for other in imports[name]), default=0)

    layers = {name: layer(name) for name in imports}
    assert max(layers.values()) <= 5, sorted(layers.items(), key=lambda item: item[1])
    # the job sits above the store, the store above the run's identity
    assert layers["train"] > layers["tracking"] > layers["identity"]


def test_nothing_outside_priors_names_a_particular_prior():
    named = re.compile(r"\bgmm\b|mixture|StandardPrior|NoPrior|[\"']standard[\"']", re.IGNORECASE)
    hits = [f"{path.name}:{number}: {line.strip()}" for path in sorted(PACKAGE.glob("*.py")) if path.name != "priors.py"
            for number, line in enumerate(path.read_text().splitlines(), 1) if named.search(line)]
    assert hits == []


def test_checking_a_config_loads_no_lightning():
    code = ("import sys; import vae_sweeps.config, vae_sweeps.identity, vae_sweeps.options; "
            "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'torchvision', 'mlflow') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_the_check_of_a_job_refuses_a_bad_value_before_lightning_is_imported(tmp_path):
    # what vae_sweeps/__main__.py does before it imports the job's module (and Lightning with it),
    # for a config of ours and for one with a user's dataset option (examples/)
    code = ("import sys\n"
            "from vae_sweeps.config import validate\n"
            "from vae_sweeps.errors import ConfigError\n"
            "from vae_sweeps.identity import compose\n"
            "validate(compose(['paths.output_dir=.']))\n"
            "try:\n"
            "    validate(compose(['paths.output_dir=.', '+trainer.epochs=1']))\n"
            "except ConfigError as err:\n"
            "    print(err)\n"
            "print(sorted(m for m in ('pytorch_lightning', 'lightning') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VAE_SWEEPS_DATA_DIR")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    refusal, loaded = done.stdout.strip().splitlines()
    assert refusal.startswith("trainer.epochs=1 is not allowed: Lightning's Trainer takes no setting epochs")
    assert loaded == "[]"


def test_importing_the_package_registers_no_resolver():
    modules = sorted(f"vae_sweeps.{path.stem}" for path in PACKAGE.glob("*.py"))  # __main__ too, as a module
    code = ("from omegaconf import OmegaConf\n"
            f"for name in {modules!r}: __import__(name)\n"
            "print([n for n in ('launch_id', 'jobs_at_once') if OmegaConf.has_resolver(n)])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_tests_that_share_a_costly_fixture_go_to_one_worker():
    from conftest import SHARED_FIXTURE_MODULES, scope_of

    assert "test_report.py" in SHARED_FIXTURE_MODULES and "test_cli.py" not in SHARED_FIXTURE_MODULES
    assert scope_of("tests/test_report.py::test_a") == scope_of("tests/test_report.py::test_b") == "tests/test_report.py"
    plans = "tests/test_experiments.py::test_the_experiment_plans_the_recorded_jobs_in_the_recorded_order"
    multiruns = "tests/test_experiments.py::test_each_experiment_is_a_multirun_of_its_part_at_the_study_budget"
    assert scope_of(f"{plans}[seeds10]") == scope_of(f"{multiruns}[seeds10]") != scope_of(f"{plans}[table1]")
    assert scope_of("tests/test_cli.py::test_a") == "tests/test_cli.py::test_a"  # any other test: on its own
