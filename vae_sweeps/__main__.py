"""``python -m vae_sweeps [overrides]`` trains one VAE; ``-m`` sweeps (Hydra multirun)."""

import difflib
import os
import re
import shlex
import signal
import sys
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException, SearchPathException
from hydra.types import RunMode
from omegaconf import DictConfig

from vae_sweeps import resolvers
from vae_sweeps.errors import SweepFailed, UserError, refuse_password


# Hydra's refusals of a command line, before any job starts: an option that does not exist, a
# key that is not in the config, an override it cannot parse, a --config-dir that is not there.
HYDRA_REFUSALS = (ConfigCompositionException, OverrideParseException, SearchPathException)
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from vae_sweeps.config import validate  # after Hydra has parsed the command line: --help stays fast

    try:
        validate(cfg)  # before Lightning is imported: a bad value is refused in seconds, not ten
        if cfg.get("tune") and cfg.tune.get("study"):  # a worker of a tuning study (tuning_sweep.py)
            from vae_sweeps import tuning

            tuning.check(cfg)
            return tuning.work(cfg)
        from vae_sweeps.train import train

        result = train(cfg)
    except UserError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep records this job as failed and goes on
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # a skipped job has said why in its log (train.py); the study sweeper counts it from the result
    if "test/loss" in result:  # not for a run that is still training
        print(f"test/recon {result['test/recon']:.2f}  test/kl {result['test/kl']:.2f}  "
              f"test/loss {result['test/loss']:.2f}  (per image)")
    print(f"MLflow run id: {result['run_id']}")
    return result


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _keys_beside(key: str) -> tuple[str, list[str]]:
    """(the section of the project's config that ``key`` would be in, that section's keys): the
    top level ("") where ``key`` has no section, or names one that is not there. No keys if the
    config cannot be composed here."""
    from omegaconf import DictConfig, OmegaConf

    from vae_sweeps.identity import compose

    try:
        config = compose(["paths.output_dir=."])
    except Exception:  # only the hint suffers
        return "", []
    section = key.rpartition(".")[0]
    node = OmegaConf.select(config, section) if section else config
    if not isinstance(node, DictConfig):
        section, node = "", config
    return section, [str(k) for k in node.keys()]


def hydra_refusal(err: Exception) -> str:
    """Hydra's refusal of the command line as one line: what was wrong, what is allowed, an example."""
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(name, err.options, n=1) or list(err.options)[:1]
        help_flag = "--hydra-help" if group.startswith("hydra/") else "--help"
        return (f"{group}={name} is not allowed: choose one of {', '.join(err.options)} (the options of the config "
                f"group {group}, as {help_flag} lists them), e.g. {group}={close[0]}.")
    if isinstance(err, OverrideParseException):
        why = re.sub(r"\s*expecting \{.*?\}|Error parsing override '.*?'|See https://\S+ for details", "", err.message)
        return (f"the override {err.override!r} cannot be read ({_one_line(why)}): write key=value, and for a sweep "
                "-m key=a,b,c without spaces (or quoted: 'key=a, b'), e.g. -m model=mlp2,mlp3 (Hydra's override "
                f"grammar: {GRAMMAR}).")
    missing = re.match(r"Could not override '(.+?)'\.\s+To append to your config use \+(\S+)", str(err))
    if missing:
        key, override = missing.groups()
        section, keys = _keys_beside(key)
        close = difflib.get_close_matches(key[len(section) + 1:] if section else key, keys, n=1)
        hint = f" (did you mean {section + '.' if section else ''}{close[0]}?)" if close else ""
        where = f"{section} has" if section else "its top level has"
        return (f"{key} is not a key of the config{hint}; {where} {', '.join(keys)}. A key that is not in the "
                f"config takes a + (+{override}), and is then checked against what reads it.")
    return f"{_one_line(str(err).split('Config search path:')[0]).rstrip('.')} (Hydra's refusal of the command line)."


def refuse_passwords(args: list[str]) -> None:
    """Refuse a URI with a password on the command line or in MLFLOW_TRACKING_URI before Hydra
    starts: Hydra saves the overrides under outputs/ (.hydra/) before any job begins."""
    for arg in args:
        key, _, value = arg.partition("=")
        refuse_password(key.lstrip("+~"), value.strip("'\""))  # tracking.uri='http://...'; Hydra unquotes it
    refuse_password("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI", ""))


if __name__ == "__main__":
    try:
        refuse_passwords(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    resolvers.register()  # ${launch_id:} of the output folder, ${jobs_at_once:...}: before Hydra composes
    # The command behind every run of this launch, its `command` tag (train.py), in any launcher's
    # job: the report names the commands behind its numbers. It holds no password (refused above).
    os.environ["VAE_SWEEPS_COMMAND"] = shlex.join(["python", "-m", "vae_sweeps", *sys.argv[1:]])
    # Hydra prints its own errors over several lines and exits 1 unless HYDRA_FULL_ERROR is set,
    # when it raises them: then a refusal of the command line is said in one line, exit 2, and any
    # other error is printed as Hydra would (its stack trace, exit 1). A user who sets
    # HYDRA_FULL_ERROR gets Hydra's errors as they are.
    hydra_errors = "HYDRA_FULL_ERROR" in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except HYDRA_REFUSALS as err:
        if hydra_errors:
            raise
        print(f"error: {hydra_refusal(err)}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if hydra_errors:
            raise
        traceback.print_exc()
        sys.exit(1)
    except SweepFailed as err:  # jobs with bad values (2), or jobs that failed (1): the study sweeper's list
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.status)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (faults.Interrupted), in a run or a sweep
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        sys.exit(128 + signum)  # as a shell expects: 130, 143
