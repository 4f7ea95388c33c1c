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
   Then, without training, the unpruned arm's 12 full validation curves are replayed through
   other pruning rules (the same trials in the same order): the epochs each would have spent and
   the 30-epoch loss of the trial each would have selected.

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

from omegaconf import OmegaConf

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


def validation_curves(folder: Path) -> list[list[float]]:
    """Each trial's validation loss after every epoch, in the order of the trials (tuning()'s store)."""
    from mlflow import MlflowClient

    from vae_sweeps import trials as trials_module
    from vae_sweeps.tuning import OBJECTIVE

    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlruns/mlflow.db")
    done = trials_module.load_trials(client, "vae_sweeps").sort_values("trial")
    return [[m.value for m in sorted(client.get_metric_history(run_id, OBJECTIVE), key=lambda m: m.step)]
            for run_id in done["run_id"]]


def replay_optuna(curves: list[list[float]], pruner) -> tuple[int, int | None]:
    """Optuna's ``pruner`` replayed on full validation curves, trial by trial in their order, as
    the tuning's callback asks it after each epoch but the last: (the epochs it would have let
    the trials spend, the trial it would select: the complete one with the lowest last loss, None
    where none is complete)."""
    import optuna

    study = optuna.create_study(pruner=pruner)
    spent, chosen = 0, None
    for number, curve in enumerate(curves):
        trial = study.ask()
        for epoch, value in enumerate(curve, 1):
            spent += 1
            trial.report(value, epoch)
            if epoch < len(curve) and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, curve[-1])
            chosen = number if chosen is None or curve[-1] < curves[chosen][-1] else chosen
    return spent, chosen


def replay_paused(curves: list[list[float]], min_epochs: int, factor: int) -> tuple[int, int]:
    """ASHA as Li et al. (2020) state it, replayed on full validation curves with one worker: a
    trial that is not promoted at a rung is paused, not ended, and goes on when later trials
    make it one of the best 1/``factor`` of the rung (the highest rung with such a trial first;
    else a new trial starts). Optuna cannot pause a trial, so its pruner decides at once. Returns
    (epochs spent, the trial selected: the lowest loss at the highest rung reached)."""
    top = len(curves[0])
    rungs = [min_epochs * factor ** k for k in range(top) if min_epochs * factor ** k < top] + [top]
    reached = [{} for _ in rungs]  # per rung: trial -> its loss there
    promoted = [set() for _ in rungs]
    trained, started = [0] * len(curves), 0
    while True:
        for k in reversed(range(len(rungs) - 1)):
            best = sorted(reached[k], key=reached[k].get)[:len(reached[k]) // factor]
            waiting = [t for t in best if t not in promoted[k]]
            if waiting:
                t, rung = waiting[0], k + 1
                promoted[k].add(t)
                break
        else:
            if started == len(curves):
                break
            t, rung, started = started, 0, started + 1
        trained[t] = rungs[rung]
        reached[rung][t] = curves[t][rungs[rung] - 1]
    highest = max(k for k, values in enumerate(reached) if values)
    return sum(trained), min(reached[highest], key=reached[highest].get)


def replays(curves: list[list[float]], min_epochs: int, factor: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    halving = optuna.pruners.SuccessiveHalvingPruner
    unpruned = len(curves) * len(curves[0])
    best = min(curve[-1] for curve in curves)
    rules = (
        (f"Optuna's successive halving, as tuned (eta {factor})",
         lambda: replay_optuna(curves, halving(min_resource=min_epochs, reduction_factor=factor))),
        (f"the same, no promotion before {factor} trials reach a rung (bootstrap_count={factor - 1})",
         lambda: replay_optuna(curves, halving(min_resource=min_epochs, reduction_factor=factor,
                                               bootstrap_count=factor - 1))),
        (f"the same with eta {factor + 1}",
         lambda: replay_optuna(curves, halving(min_resource=min_epochs, reduction_factor=factor + 1))),
        ("ASHA pausing the trials it does not promote (Li et al. 2020; not in Optuna)",
         lambda: replay_paused(curves, min_epochs, factor)),
    )
    print(f"   replayed on the unpruned arm's {len(curves)} curves (the same trials in the same order, no "
          f"training): epochs, and the selected trial's loss after {len(curves[0])} epochs")
    for name, replay in rules:
        spent, chosen = replay()
        selects = ("no trial completes" if chosen is None else
                   f"trial {chosen}: {curves[chosen][-1]:.2f} ({curves[chosen][-1] - best:+.2f} nats)")
        print(f"   - {name}: {spent} epochs ({spent / unpruned:.0%}), {selects}")


def pruning(data_root: str, trials: int, min_epochs: int, max_epochs: int, extra: list[str]) -> None:
    results = {}
    for name, prune in (("pruned", "true"), ("unpruned", "false")):
        with tempfile.TemporaryDirectory() as tmp:
            wall, done = tuning(Path(tmp), data_root, "mlp2", f"tune.trials={trials}", f"tune.min_epochs={min_epochs}",
                                f"tune.max_epochs={max_epochs}", f"tune.budget={trials * max_epochs}",
                                f"tune.prune={prune}", "tune.sampler_seed=0", *extra)
            if prune == "false":
                curves = validation_curves(Path(tmp))
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
    replays(curves, min_epochs, OmegaConf.load(PROJECT / "conf/tune/asha.yaml").reduction_factor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("VAE_SWEEPS_DATA_DIR", "data"))
    parser.add_argument("--tiny", action="store_true", help="a few short epochs of each: a smoke test")
    parser.add_argument("--only", choices=("fixed", "pruning"), help="one of the two")
    parser.add_argument("--threads", type=int, help="torch threads per job (default: the usable cores)")
    args = parser.parse_args()
    extra = ["threads=1", "++trainer.limit_train_batches=5", "++trainer.limit_val_batches=2"] if args.tiny else []
    extra += [f"threads={args.threads}"] if args.threads else []
    if args.only in (None, "fixed"):
        fixed_cost(args.data_root, 3, 3 if not args.tiny else 1, extra)
    if args.only in (None, "pruning"):
        if args.tiny:
            pruning(args.data_root, 4, 1, 4, extra)
        else:
            pruning(args.data_root, 12, 3, 30, extra)


if __name__ == "__main__":
    main()
