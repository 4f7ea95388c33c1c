#!/usr/bin/env bash
# hydra/launcher=slurm, end to end on a throwaway single-node SLURM cluster on this machine
# (munge with a generated key, slurmctld and slurmd on 127.0.0.1, no accounting daemon, no
# cgroups), then two checks:
#   a. a 2-job sweep through hydra/launcher=slurm: both runs end FINISHED;
#   b. a job with a 1-minute time limit and more epochs than fit in it: it is signalled,
#      requeued and resumed, and ends FINISHED in the same MLflow run, every epoch logged once.
# Everything lives in one temp dir, removed at the end; every daemon started here is stopped by
# its PID. Runs as root (slurmd starts the jobs as their user). About 4 minutes.
#   scripts/slurm-local.sh        (needs `make install` and: apt-get install -y slurmctld slurmd munge)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
export VAE_SWEEPS_DATA_DIR="${VAE_SWEEPS_DATA_DIR:-$(cd .. && pwd)/shared/datasets}"
export MLFLOW_DISABLE_TELEMETRY=true
unset MLFLOW_TRACKING_URI  # it would win over the temp store's tracking.uri
export PATH="$PATH:/usr/sbin:/sbin"  # munged, slurmctld and slurmd live there on Debian

log() { echo "slurm-local: $*"; }
die() { echo "slurm-local: FAILED: $*" >&2; exit 1; }

# --- What it needs -------------------------------------------------------------------------
for bin in munged slurmctld slurmd sbatch squeue scontrol sinfo srun; do
  command -v "$bin" >/dev/null || { echo "slurm-local: $bin not found. Install SLURM and munge with:
  apt-get install -y slurmctld slurmd munge" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || die "run this as root: slurmd must be root to start jobs"
[ -x "$PY" ] || die "$PY not found: run make install first"
[ -d "$VAE_SWEEPS_DATA_DIR/MNIST" ] || die "no MNIST in $VAE_SWEEPS_DATA_DIR: set VAE_SWEEPS_DATA_DIR"
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- Clean-up: cancel the jobs, stop the daemons by PID, remove the temp dir ----------------
tmp=$(mktemp -d -t slurm-local.XXXXXX)
pids=()  # munged, slurmctld, slurmd, in the order started
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ ${#pids[@]} -eq 3 ] && [ -n "$(squeue --noheader 2>/dev/null)" ]; then
    scancel --full "$(squeue --noheader --format=%A | sort -u)" 2>/dev/null || true
    for _ in $(seq 30); do [ -z "$(squeue --noheader 2>/dev/null)" ] && break; sleep 1; done
  fi
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  if [ "$status" != 0 ]; then
    for f in "$tmp"/log/*.log; do
      [ -s "$f" ] && { echo "--- last lines of $f:"; tail -n 15 "$f"; }
    done
  fi
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- munge, with a key generated for this cluster -------------------------------------------
mkdir -p "$tmp"/{munge,log,state,spool}
chmod 711 "$tmp" && chmod 755 "$tmp/munge"  # munged wants its socket reachable by all
head -c 1024 /dev/urandom >"$tmp/munge/munge.key"
chmod 400 "$tmp/munge/munge.key"
munged --foreground --key-file="$tmp/munge/munge.key" --socket="$tmp/munge/munge.socket" \
  --pid-file="$tmp/munge/munged.pid" --seed-file="$tmp/munge/munged.seed" --log-file="$tmp/log/munged.log" \
  >>"$tmp/log/munged.log" 2>&1 &
pids+=($!)
for _ in $(seq 20); do [ -S "$tmp/munge/munge.socket" ] && break; sleep 0.5; done
[ -S "$tmp/munge/munge.socket" ] || die "munged did not start"

# --- slurm.conf: one node with this machine's CPUs and a bit less than its memory -----------
node=$(hostname -s)
cpus=$(nproc)
memory_mb=$(awk '/^MemTotal:/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
export SLURM_CONF="$tmp/slurm.conf"  # for sbatch, squeue, scontrol here and in the jobs
cat >"$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$tmp/munge/munge.socket,cred_expire=10
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/log/slurmctld.log
SlurmdLogFile=$tmp/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
# bind to 127.0.0.1 (NodeAddr, SlurmctldHost), not to every interface
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
ReturnToService=2
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
log "SLURM $(slurmctld -V | awk '{print $2}'): node $node, $cpus CPUs, ${memory_mb} MB, in $tmp"
slurmctld -D -f "$SLURM_CONF" >>"$tmp/log/slurmctld.log" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" >>"$tmp/log/slurmd.log" 2>&1 &
pids+=($!)
for _ in $(seq 60); do
  [ "$(sinfo --noheader --format=%T 2>/dev/null)" = idle ] && break
  kill -0 "${pids[1]}" 2>/dev/null || die "slurmctld exited at start"
  kill -0 "${pids[2]}" 2>/dev/null || die "slurmd exited at start"
  sleep 0.5
done
[ "$(sinfo --noheader --format=%T)" = idle ] || die "the node is not idle after 30 s: $(sinfo)"

# --- The checks: sweeps through hydra/launcher=slurm into a temp MLflow store ----------------
store="sqlite:///$tmp/mlflow.db"
job=(model=mlp2 'model.hidden=[64]' eval.iw_samples=2 "tracking.uri=$store")
# the runs of an experiment in the store, one line each: seed status resumed_from_epoch epochs...
runs() {
  "$PY" - "$store" "$1" <<'PYEOF'
import sys
from mlflow import MlflowClient

client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name(sys.argv[2])
for run in client.search_runs([experiment.experiment_id]) if experiment else []:
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    print(run.data.params.get("seed"), run.info.status, run.data.tags.get("resumed_from_epoch", "-"),
          *epochs)
PYEOF
}

log "a. a 2-job sweep through hydra/launcher=slurm"
timeout 300 "$PY" -m vae_sweeps -m hydra/launcher=slurm "${job[@]}" seed=0,1 trainer.max_epochs=1 \
  ++trainer.limit_train_batches=10 tracking.experiment=sweep hydra.sweep.dir="$tmp/sweep" \
  >"$tmp/log/sweep.log" 2>&1 || { tail -n 30 "$tmp/log/sweep.log" >&2; die "the sweep failed (above)"; }
found=$(runs sweep | awk '{print $1, $2}' | sort | tr '\n' ' ')
[ "$found" = "0 FINISHED 1 FINISHED " ] || die "expected runs of seeds 0 and 1 FINISHED, found: ${found:-none}"
log "   both runs FINISHED (${SECONDS} s so far)"

# b. More epochs than fit in a 1-minute time limit. SLURM checks time limits every 30 s, so
# each attempt gets its signal about 30 s after it starts, half of it spent starting Python.
epochs=60
log "b. a job with a 1-minute time limit and $epochs epochs: signalled, requeued, resumed"
timelimit=(timeout 400 "$PY" -m vae_sweeps -m hydra/launcher=slurm "${job[@]}" seed=0 trainer.max_epochs=$epochs
  ++trainer.limit_train_batches=50 hydra.launcher.timeout_min=1 tracking.experiment=timelimit)
for launch in 1 2 3; do
  "${timelimit[@]}" hydra.sweep.dir="$tmp/timelimit$launch" >"$tmp/log/timelimit$launch.log" 2>&1 && break
  # On a busy machine the requeues may run out: the run stays KILLED and resumable, and
  # launching the sweep again resumes it.
  grep -q "timed-out too many times" "$tmp/log/timelimit$launch.log" ||
    { tail -n 30 "$tmp/log/timelimit$launch.log" >&2; die "the time-limited sweep failed (above)"; }
  [ "$launch" != 3 ] || die "the job did not finish in 3 launches of its sweep: too busy a machine?"
  log "   its requeues ran out before it finished; launching the sweep again"
done
requeues=$(cat "$tmp"/timelimit*/.submitit/*/*_log.out | grep -c "Requeued job" || true)
[ "$requeues" -ge 1 ] || die "the job was never requeued (its submitit logs say no 'Requeued job')"
finished=$(runs timelimit | awk '$2 == "FINISHED"')
[ "$(echo "$finished" | grep -c .)" = 1 ] || die "expected one FINISHED run, found: $(runs timelimit | cut -c 1-60)"
read -r _ _ resumed history <<<"$finished"
[ "$resumed" != - ] || die "the FINISHED run has no resumed_from_epoch tag: it was not resumed"
[ "$history" = "$(seq -s ' ' 1 "$epochs")" ] || die "train/loss of the run has steps '$history', expected 1 to $epochs once each"
log "   requeued $requeues time(s), FINISHED in the same run (resumed from epoch $resumed), every epoch logged once"

log "OK in ${SECONDS} s"
