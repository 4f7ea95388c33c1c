"""The published study store: the run records behind ``results/``, committed with them.

The study trains into a working store (``make study``: ``mlruns/study/mlflow.db``, its
checkpoints and figures beside it in ``artifacts/``; none of it is committed). Its records, the
SQLite database alone (params, per-epoch metric histories, test metrics, tags; no artifacts),
are published as ``results/store/mlflow.db``:

- ``publish``: a consistent copy of the working database (SQLite's backup, safe while jobs
  write), compacted; a run still RUNNING there is KILLED in the copy, since no process trains
  the copy's runs. ``make results`` publishes the records behind ``results/``; while a study
  runs, ``make save-study`` copies its progress to ``results/in-progress/mlflow.db`` as often as
  wanted, to commit before a stop (a machine's local files may not survive it).
- ``restore``: on a machine without a working store (a fresh clone, a new session), the
  working store starts as a copy of the committed records (the progress of a study not yet
  published, else the published ones), so that ``make study`` continues the
  study: FINISHED runs are skipped, a KILLED run resumes where its checkpoint survived, and
  every other configuration trains anew. A working store that exists is kept as it is.

    python -m vae_sweeps.study_store publish mlruns/study/mlflow.db results/store/mlflow.db
    python -m vae_sweeps.study_store restore results/store/mlflow.db mlruns/study/mlflow.db

MLflow opens the published store as it is (``mlflow ui --backend-store-uri
sqlite:///results/store/mlflow.db``), and ``make report`` rebuilds the tables, claims and CSVs of
``results/`` from it, without training (``make check-results``).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

from vae_sweeps import store
from vae_sweeps.errors import UserError


def copy_database(source: Path, target: Path) -> None:
    """A consistent, compacted copy of the SQLite database ``source`` at ``target``, written
    whole or not at all."""
    partial = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    try:
        with closing(sqlite3.connect(source, timeout=120)) as src, closing(sqlite3.connect(partial)) as dst:
            src.backup(dst)
            dst.execute("UPDATE runs SET status = 'KILLED', end_time = COALESCE(end_time, start_time) "
                        "WHERE status = 'RUNNING'")  # no process trains the copy's runs
            dst.commit()
            dst.execute("VACUUM")
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def publish(working: Path, published: Path) -> int:
    """Copy the working store's records to ``published``; returns the runs it holds."""
    if not working.is_file():
        raise UserError(f"there is no study store at {working} to publish (make study trains one)")
    copy_database(working, published)
    with closing(sqlite3.connect(published)) as con:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def restore(published: Path, working: Path) -> bool:
    """Start the working store as a copy of the published one, unless it exists or there is
    none to copy; True if it did. The copy's artifact locations point beside it."""
    if working.exists() or not published.is_file():
        return False
    copy_database(published, working)
    (working.parent / "artifacts").mkdir(exist_ok=True)
    try:
        with store.exclusive(store.store_lock(working)):
            store.follow_moved_artifacts(working)
    except BaseException:  # a half-restored store would be kept as it is by the next restore
        working.unlink()
        raise
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vae_sweeps.study_store", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("publish", "restore"))
    parser.add_argument("source", type=Path, help="the database to copy from")
    parser.add_argument("target", type=Path, help="the database to write")
    args = parser.parse_args(argv)
    if args.action == "publish":
        try:
            runs = publish(args.source, args.target)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2)
        print(f"Published {runs} run record(s) of {args.source} to {args.target}.")
    elif restore(args.source, args.target):
        print(f"Started the study store {args.target} from the published {args.source}: "
              "make study continues the study from there.")
    elif not args.target.exists():
        print(f"No published store at {args.source}: the study starts an empty store at {args.target}.",
              file=sys.stderr)


if __name__ == "__main__":
    main()
