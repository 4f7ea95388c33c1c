"""What a tuning trial costs beyond its epochs, and what pruning saves (docs/tuning.md).

    python benchmarks/tuning_bench.py             # both, on MNIST (72 min on 2 idle cores, 2026-12-07)
    python benchmarks/tuning_bench.py --tiny      # a smoke test: a few short epochs of each

1. Fixed cost: a worker trains `--trials` trials of 3 epochs each (mlp3, the study's settings,
   no pruning) in one process; a trial's fixed cost is its time outside its training epochs (its
   data, run, trainer, checkpoint and store calls), against the aim of at most 25% of a
   3-epoch trial. The process's own start is paid once per worker, not per trial; it is printed
   apart.
2. Pruning: the same 12 trials of mlp2 (the same sampler seed: TPE's first 10 are the same
   random draws), with ASHA (3 to 30 epochs) and without: epochs spent and the best validation
   loss of each. The aim: the unpruned best within 0.5 nats, at a third of the epochs or less.

Each runs `python -m vae_sweeps experiment=tune_table1` in a temporary folder with its own store,
one arm (hydra.sweeper.params), and reads the study back from the journal beside the store.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def tuning(folder: Path, data_root: str, model: str, *overrides: str) -> tuple[float, list]:
    """(wall seconds, the study's trials) of one tuning of ``model`` into ``folder``."""
    import optuna

    from vae_sweeps import tuning as tuning_module

    command = [sys.executable, "-m", "vae_sweeps", "experiment=tune_table1", "hydra.sweeper.part=null",
               f"hydra.sweeper.params={{model:{model}}}", f"data.root={data_root}", "trainer.enable_progress_bar=false",
               f"tracking.uri=sqlite:///{folder}/mlruns/mlflow.db", f"hydra.sweep.dir={folder}/sweep", *overrides]
    began = time.monotonic()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)})
    wall = time.monotonic() - began
    if done.returncode != 0:
        sys.exit(f"the tuning failed:\n{done.stderr[-3000:]}")
    storage = tuning_module.open_storage(f"journal:{folder}/mlruns/tuning.journal")
    (summary,) = optuna.study.get_all_study_summaries(storage)
    return wall, optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def fixed_cost(data_root: str, trials: int, epochs: int, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wall, done = tuning(Path(tmp), data_root, "mlp3", f"tune.trials={trials}", f"tune.min_epochs={epochs}",
                            f"tune.max_epochs={epochs}", f"tune.budget={trials * epochs}", "tune.prune=false", *extra)
    seconds = [t.user_attrs["seconds"] for t in done]
    fixed = [t.user_attrs["seconds"] - t.user_attrs["epoch_seconds"] for t in done]
    share = sum(fixed) / sum(seconds)
    print(f"1. fixed cost: {len(done)} trials of {epochs} epochs (mlp3) in one worker, {wall:.1f} s in all, "
          f"{wall - sum(seconds):.1f} s of it the process's start and end (once per worker)")
    for t, s, f in zip(done, seconds, fixed):
        print(f"   trial {t.number}: {s:.1f} s, of which {f:.1f} s outside its epochs ({f / s:.0%})")
    print(f"   fixed cost per trial {sum(fixed) / len(fixed):.1f} s = {share:.0%} of a {epochs}-epoch trial "
          f"(aim: at most 25%): {'met' if share <= 0.25 else 'NOT met'}")


def pruning(data_root: str, trials: int, min_epochs: int, max_epochs: int, extra: list[str]) -> None:
    results = {}
    for name, prune in (("pruned", "true"), ("unpruned", "false")):
        with tempfile.TemporaryDirectory() as tmp:
            wall, done = tuning(Path(tmp), data_root, "mlp2", f"tune.trials={trials}", f"tune.min_epochs={min_epochs}",
                                f"tune.max_epochs={max_epochs}", f"tune.budget={trials * max_epochs}",
                                f"tune.prune={prune}", "tune.sampler_seed=0", *extra)
        complete = [t for t in done if t.state.name == "COMPLETE"]
        results[name] = (sum(t.user_attrs["epochs"] for t in done), min(t.value for t in complete), wall, done)
    (p_epochs, p_best, p_wall, p_done), (u_epochs, u_best, u_wall, u_done) = results["pruned"], results["unpruned"]
    first = min(10, trials)  # TPE's random start-up trials: the same draws with the same seed
    same = [t.params for t in p_done[:first]] == [t.params for t in u_done[:first]]
    print(f"2. pruning: the same {trials} trials of mlp2 "
          f"({f'the first {first} identical' if same else 'NOT the same draws'})")
    print(f"   unpruned: {u_epochs} epochs, best validation loss {u_best:.2f} ({u_wall / 60:.1f} min)")
    print(f"   pruned:   {p_epochs} epochs ({p_epochs / u_epochs:.0%} of them), best {p_best:.2f} "
          f"({p_best - u_best:+.2f} nats; {p_wall / 60:.1f} min)")
    met = p_epochs <= u_epochs / 3 and p_best - u_best <= 0.5
    print(f"   aim (within 0.5 nats at a third of the epochs or less): {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("VAE_SWEEPS_DATA_DIR", "data"))
    parser.add_argument("--tiny", action="store_true", help="a few short epochs of each: a smoke test")
    parser.add_argument("--only", choices=("fixed", "pruning"), help="one of the two")
    args = parser.parse_args()
    extra = ["threads=1", "++trainer.limit_train_batches=5", "++trainer.limit_val_batches=2"] if args.tiny else []
    if args.only in (None, "fixed"):
        fixed_cost(args.data_root, 3, 3 if not args.tiny else 1, extra)
    if args.only in (None, "pruning"):
        if args.tiny:
            pruning(args.data_root, 4, 1, 4, extra)
        else:
            pruning(args.data_root, 12, 3, 30, extra)


if __name__ == "__main__":
    main()
