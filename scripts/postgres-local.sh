#!/usr/bin/env bash
# The team server on PostgreSQL, end to end on this machine: a throwaway PostgreSQL on
# 127.0.0.1, `make server` on it, a 2-job sweep and the report through the server, then the
# same sweep again, which must skip both jobs. Everything lives in one temp dir, removed at
# the end; every process started here is stopped by its PID. Runs as root or as a normal user.
#   scripts/postgres-local.sh        (needs `make install` and: apt-get install -y postgresql)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
export VAE_SWEEPS_DATA_DIR="${VAE_SWEEPS_DATA_DIR:-data}"  # MNIST/raw/ and FashionMNIST/raw/ (data/ by default, as a job)
export MLFLOW_DISABLE_TELEMETRY=true

log() { echo "postgres-local [${SECONDS} s]: $*"; }
die() { echo "postgres-local: FAILED: $*" >&2; exit 1; }

# --- What it needs -------------------------------------------------------------------------
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ] ||
  die "no PostgreSQL server in /usr/lib/postgresql/<version>/bin. Install it with:
  apt-get update && apt-get install -y --no-install-recommends postgresql"
[ -x "$PY" ] || die "$PY not found: run make install first"
"$PY" -c 'import psycopg' 2>/dev/null ||
  die "the PostgreSQL driver psycopg 3 is missing from $PY: run make install (it installs .[dev,server])"
# PostgreSQL refuses to run as root: as root, its commands run as the postgres user.
as_pg=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || die "running as root, but there is no postgres user to run PostgreSQL as"
  as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi
answers() { "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" 2>/dev/null; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- Clean-up: stop what was started, by PID, then remove the temp dir ----------------------
tmp=$(mktemp -d -t postgres-local.XXXXXX)
pg_pid= server_pid=
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$server_pid" ]; then  # make, mlflow and its workers: the process group led by make
    kill -TERM -- "-$server_pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 -- "-$server_pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$server_pid" 2>/dev/null || true
  fi
  if [ -n "$pg_pid" ]; then  # SIGINT: PostgreSQL's fast shutdown
    kill -INT "$pg_pid" 2>/dev/null || true
    wait "$pg_pid" 2>/dev/null || true
  fi
  if [ "$status" != 0 ]; then
    for f in "$tmp/server.log" "$tmp/pg/postgres.log"; do
      [ -s "$f" ] && { echo "--- last lines of $f:"; tail -n 20 "$f"; }
    done
  fi
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- A throwaway PostgreSQL: 127.0.0.1 only, password authentication, sockets in the temp dir
pg_port=$(free_port)
pg_user=mlflow pg_db=mlflow
pg_password=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
mkdir "$tmp/pg"
echo "$pg_password" >"$tmp/pg/password"
if [ ${#as_pg[@]} -gt 0 ]; then chmod 711 "$tmp" && chown -R postgres: "$tmp/pg"; fi
log "PostgreSQL $(basename "$(dirname "$pg_bin")") on 127.0.0.1:$pg_port"
(cd "$tmp" && "${as_pg[@]}" "$pg_bin/initdb" -D "$tmp/pg/data" -U "$pg_user" --pwfile="$tmp/pg/password" \
  --auth-local=trust --auth-host=scram-sha-256 --no-locale -E UTF8) >"$tmp/initdb.log" 2>&1 ||
  { cat "$tmp/initdb.log" >&2; die "initdb failed (above)"; }
(cd "$tmp" && exec "${as_pg[@]}" "$pg_bin/postgres" -D "$tmp/pg/data" -p "$pg_port" \
  -c listen_addresses=127.0.0.1 -c unix_socket_directories="$tmp/pg") >"$tmp/pg/postgres.log" 2>&1 &
pg_pid=$!
export PGPASSWORD=$pg_password
for _ in $(seq 60); do
  "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" -U "$pg_user" -d postgres && break
  kill -0 "$pg_pid" 2>/dev/null || die "PostgreSQL exited at start"
  sleep 0.5
done
"$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" -U "$pg_user" -d postgres || die "PostgreSQL did not answer within 30 s"
"$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U "$pg_user" "$pg_db" || die "createdb $pg_db failed"

# --- make server on it, in its own process group, until it answers --------------------------
# SQLAlchemy 2.1 opens postgresql:// with psycopg 3; postgresql+psycopg:// says so explicitly
# and also works with SQLAlchemy 2.0.
backend="postgresql+psycopg://$pg_user:$pg_password@127.0.0.1:$pg_port/$pg_db"
port=$(free_port)
export MLFLOW_TRACKING_URI="http://127.0.0.1:$port"
log "make server on $MLFLOW_TRACKING_URI, backend postgresql+psycopg://$pg_user:***@127.0.0.1:$pg_port/$pg_db"
# One worker and no job runner (MLflow's GenAI jobs, unused here; its huey processes would
# leave a folder in /dev/shm behind): fewer processes to start on a small machine.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid make server BACKEND="$backend" PORT="$port" \
  ARTIFACTS="$tmp/artifacts" SERVER_ARGS="--workers 1" >"$tmp/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 120); do
  answers "$MLFLOW_TRACKING_URI/health" && break
  kill -0 "$server_pid" 2>/dev/null || die "make server exited at start"
  sleep 1
done
answers "$MLFLOW_TRACKING_URI/health" || die "make server did not answer within 120 s"

# --- A 2-job sweep, the report, then the same sweep again ----------------------------------
sweep=("$PY" -m vae_sweeps -m model=mlp2 seed=0,1 'model.hidden=[64]' trainer.max_epochs=1
  +trainer.limit_train_batches=10 +trainer.limit_val_batches=2 eval.iw_samples=2 eval.judge_epochs=1
  data.download=false trainer.enable_progress_bar=false hydra.sweep.dir="$tmp/sweep")
log "sweep: 2 jobs through the server"
"${sweep[@]}" >"$tmp/sweep1.log" 2>&1 || { tail -n 30 "$tmp/sweep1.log" >&2; die "the sweep failed (above)"; }

log "report through the server"
"$PY" -m vae_sweeps.report --out "$tmp/report" >"$tmp/report.log" 2>&1 ||
  { tail -n 30 "$tmp/report.log" >&2; die "the report failed (above)"; }
[ -s "$tmp/report/report.md" ] || die "the report wrote no $tmp/report/report.md"

log "the same sweep again: both jobs must be skipped"
"${sweep[@]}" >"$tmp/sweep2.log" 2>&1 || { tail -n 30 "$tmp/sweep2.log" >&2; die "the second sweep failed (above)"; }
grep -qF "Skipping 2 of 2 job(s)" "$tmp/sweep2.log" ||
  { tail -n 30 "$tmp/sweep2.log" >&2; die "the second sweep did not skip both jobs (above)"; }

# --- The store: 2 FINISHED runs, in PostgreSQL, their artifacts served ---------------------
"$PY" - <<'EOF' || die "the runs in the store are not as expected (above)"
from mlflow.tracking import MlflowClient

client = MlflowClient()
experiment = client.get_experiment_by_name("vae_sweeps")
runs = client.search_runs([experiment.experiment_id]) if experiment else []
found = sorted((run.data.params.get("seed"), run.info.status) for run in runs)
print("postgres-local: runs (seed, status):", found)
assert found == [("0", "FINISHED"), ("1", "FINISHED")], f"expected seeds 0 and 1 FINISHED, found {found}"
for run in runs:
    assert "checkpoints" in {a.path for a in client.list_artifacts(run.info.run_id)}, "no checkpoint served"
EOF
# The study's 2 runs, and the one judge that both runs' evaluation shares (trained once).
in_pg=$("$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U "$pg_user" -d "$pg_db" -tA -F ' ' -c \
  "select e.name, count(*) from runs r join experiments e on e.experiment_id = r.experiment_id
   where r.status = 'FINISHED' group by e.name order by e.name" | tr '\n' ';')
[ "$in_pg" = "vae_sweeps 2;vae_sweeps-judges 1;" ] ||
  die "PostgreSQL holds FINISHED runs per experiment '$in_pg', expected 'vae_sweeps 2;vae_sweeps-judges 1;'"

# --- A tuning study in a database of its own, drawn by two workers at once (docs/tuning.md) ---
# Its budget and queue are kept under PostgreSQL's advisory lock, which workers on every host reach.
"$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U "$pg_user" optuna || die "createdb optuna failed"
log "tuning: one study in PostgreSQL, two workers (hydra/launcher=joblib) through the server"
"$PY" -m vae_sweeps experiment=tune_table1 hydra.sweeper.part=null 'hydra.sweeper.params={model:mlp2}' \
  'model.hidden=[64]' +trainer.limit_train_batches=10 +trainer.limit_val_batches=2 data.download=false \
  trainer.enable_progress_bar=false threads=1 hydra/launcher=joblib hydra.launcher.n_jobs=2 tune.workers=2 \
  tune.budget=8 tune.min_epochs=1 tune.max_epochs=2 tune.reduction_factor=2 hydra.sweep.dir="$tmp/tune" \
  "tune.storage=postgresql+psycopg://$pg_user@127.0.0.1:$pg_port/optuna" >"$tmp/tune.log" 2>&1 ||
  { tail -n 30 "$tmp/tune.log" >&2; die "the tuning failed (above)"; }
"$PY" - "postgresql+psycopg://$pg_user@127.0.0.1:$pg_port/optuna" <<'EOF' || die "the tuning study is not as expected (above)"
import sys

import optuna
from mlflow.tracking import MlflowClient

(summary,) = optuna.study.get_all_study_summaries(sys.argv[1])
done = optuna.load_study(study_name=summary.study_name, storage=sys.argv[1]).get_trials()
spent = sum(int(t.user_attrs["epochs"]) for t in done)
client = MlflowClient()
runs = client.search_runs([client.get_experiment_by_name("vae_sweeps_tuning").experiment_id])
numbers = sorted(int(run.data.tags["tuning.trial"]) for run in runs)
print(f"postgres-local: {len(done)} trials, {spent} epochs, by {len({t.user_attrs['pid'] for t in done})} workers")
assert spent == 8, f"{spent} epochs spent, not the budget of 8"
assert {t.state.name for t in done} <= {"COMPLETE", "PRUNED"}, [t.state.name for t in done]
assert numbers == [t.number for t in done], f"runs of trials {numbers}, not each trial once"
EOF

log "OK in ${SECONDS} s: PostgreSQL holds both runs and their judge, the report was written, the re-run skipped both jobs,"
log "   and a tuning study that two workers shared"
