#!/usr/bin/env bash
# hydra/launcher=slurm, end to end on a throwaway single-node SLURM cluster on this machine
# (munge with a generated key, slurmctld and slurmd on 127.0.0.1, no accounting daemon, no
# cgroups), then two checks:
#   a. a 2-job sweep through hydra/launcher=slurm: both runs end FINISHED;
#   b. a job with a 1-minute time limit that trains for longer: it is signalled, requeued and
#      resumed, and ends FINISHED in the same MLflow run, every epoch logged once;
#   c. a tuning study (docs/tuning.md) drawn by two SLURM jobs at once: the two finish one study,
#      no trial twice, its budget spent to the epoch, and mark it ended in the store.
# Everything lives in one temp dir, removed at the end; every process started here is stopped
# by its PID. Runs as root (slurmd starts the jobs as their user). About 8 minutes on 2 busy
# cores, and never more than 14.
#   scripts/slurm-local.sh        (needs `make install` and: apt-get install -y slurmctld slurmd munge)
#   KEEP=1 scripts/slurm-local.sh  keeps the temp dir (logs, store, the jobs' submitit logs)
#   CASES=c scripts/slurm-local.sh runs only the checks named (default: a b c)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
export VAE_SWEEPS_DATA_DIR="${VAE_SWEEPS_DATA_DIR:-data}"  # MNIST/raw/ and FashionMNIST/raw/ (data/ by default, as a job)
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
sweep_pid=
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$sweep_pid" ] && kill -0 "$sweep_pid" 2>/dev/null; then  # timeout, which passes it on
    kill -TERM "$sweep_pid" 2>/dev/null || true
    wait "$sweep_pid" 2>/dev/null || true
  fi
  if [ ${#pids[@]} -eq 3 ] && [ -n "$(squeue --noheader 2>/dev/null)" ]; then
    # cancel the jobs left and let them end (SIGTERM, then SIGKILL after KillWait, 30 s) while
    # slurmd still runs: without it, their slurmstepd would wait for it forever
    scancel --me 2>/dev/null || true
    for _ in $(seq 60); do [ -z "$(squeue --noheader 2>/dev/null)" ] && break; sleep 1; done
    [ -z "$(squeue --noheader 2>/dev/null)" ] || echo "slurm-local: jobs still running: $(scontrol listpids 2>&1)" >&2
  fi
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  if [ "$status" != 0 ]; then
    for f in "$tmp"/log/*.log "$tmp"/*/.submitit/*/*_log.err; do
      [ -s "$f" ] && { echo "--- last lines of $f:"; tail -n 15 "$f"; }
    done
  fi
  if [ "${KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- munge, with a key generated for this cluster -------------------------------------------
# The daemons run in their own sessions: a Ctrl-C meant for this script must not stop them
# before the clean-up has ended the jobs.
mkdir -p "$tmp"/{munge,log,state,spool}
chmod 711 "$tmp" && chmod 755 "$tmp/munge"  # munged wants its socket reachable by all
head -c 1024 /dev/urandom >"$tmp/munge/munge.key"
chmod 400 "$tmp/munge/munge.key"
setsid munged --foreground --key-file="$tmp/munge/munge.key" --socket="$tmp/munge/munge.socket" \
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
# A requeued job waits cred_expire seconds (default 120, minimum 5), then starts at the next
# scheduling pass (sched_interval, default 60 s): here about 10 s after its requeue.
AuthInfo=socket=$tmp/munge/munge.socket,cred_expire=5
SchedulerParameters=sched_interval=5
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
setsid slurmctld -D -f "$SLURM_CONF" >>"$tmp/log/slurmctld.log" 2>&1 &
pids+=($!)
setsid slurmd -D -f "$SLURM_CONF" >>"$tmp/log/slurmd.log" 2>&1 &
pids+=($!)
for _ in $(seq 60); do
  [ "$(sinfo --noheader --format=%T 2>/dev/null)" = idle ] && break
  kill -0 "${pids[1]}" 2>/dev/null || die "slurmctld exited at start"
  kill -0 "${pids[2]}" 2>/dev/null || die "slurmd exited at start"
  sleep 0.5
done
[ "$(sinfo --noheader --format=%T)" = idle ] || die "the node is not idle after 30 s: $(sinfo)"

# --- The checks: sweeps through hydra/launcher=slurm into a temp MLflow store ----------------
deadline=$((SECONDS + 810))  # the whole script stays under 14 minutes
left() { echo $((deadline - SECONDS > 10 ? deadline - SECONDS : 10)); }
store="sqlite:///$tmp/mlflow.db"
# A tiny job. eval.judge_epochs: the store's first job trains the dataset's judge (5 epochs by
# default). threads=1: on a machine whose cores are busy with other work, torch's threads wait
# on each other and a job with 2 of them runs many times slower.
job=(model=mlp2 'model.hidden=[64]' eval.iw_samples=2 ++eval.judge_epochs=1 threads=1
  "tracking.uri=$store" tracking.experiment=slurm-local)
# The store's runs, one line each: seed max_epochs status resumed_from_epoch train/loss steps...
runs() {
  "$PY" - "$store" <<'PYEOF'
import sys
from mlflow import MlflowClient

client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name("slurm-local")
for run in client.search_runs([experiment.experiment_id]) if experiment else []:
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    print(run.data.params.get("seed"), run.data.params.get("trainer.max_epochs"), run.info.status,
          run.data.tags.get("resumed_from_epoch", "-"), *epochs)
PYEOF
}
# sweep LOG OVERRIDES...: a sweep of the job through hydra/launcher=slurm, within the time left,
# its output in LOG. In the background, so that this script handles a signal at once.
sweep() {
  local log=$1
  shift
  timeout "$(left)" "$PY" -m vae_sweeps -m hydra/launcher=slurm "${job[@]}" "$@" >"$log" 2>&1 &
  sweep_pid=$!
  wait "$sweep_pid"
}

CASES=${CASES:-a b c}
case " $CASES " in *" a "*)
log "a. a 2-job sweep through hydra/launcher=slurm"
sweep "$tmp/log/sweep.log" seed=0,1 trainer.max_epochs=1 ++trainer.limit_train_batches=10 \
  hydra.sweep.dir="$tmp/sweep" || { tail -n 30 "$tmp/log/sweep.log" >&2; die "the sweep failed or took too long (above)"; }
found=$(runs | awk '$2 == 1 {print $1, $3}' | sort | tr '\n' ' ') || die "could not read the runs from $store"
[ "$found" = "0 FINISHED 1 FINISHED " ] || die "expected runs of seeds 0 and 1 FINISHED, found: ${found:-none}"
log "   both runs FINISHED (${SECONDS} s so far)"
;; esac

# b. SLURM checks time limits every 30 s: a job with a 1-minute limit gets its signal 20 to
# 50 s after it starts (signal_delay_s=10), and starting Python and the run takes 10 to 25 s
# of that. The job trains for 40 s in all (max_time, which a resumed run carries on from its
# checkpoint), so it outlasts its first attempt however fast this machine is; each requeued
# attempt goes on from the last epoch, and the run's end (test, evaluation, figures) must fit
# in one attempt.
case " $CASES " in *" b "*)
log "b. a job with a 1-minute time limit that trains for 40 s: signalled, requeued, resumed"
timelimit=(seed=0 trainer.max_epochs=1000 ++trainer.max_time=00:00:00:40 ++trainer.limit_train_batches=20
  ++trainer.limit_val_batches=5 hydra.launcher.timeout_min=1)
for launch in 1 2 3; do
  sweep "$tmp/log/timelimit$launch.log" "${timelimit[@]}" hydra.sweep.dir="$tmp/timelimit$launch" && break
  status=$?
  [ "$status" != 124 ] || die "the time-limited job did not finish within the script's 10 minutes: too busy a machine?"
  # On a busy machine its requeues (max_num_timeout) may run out first: the run then stays
  # KILLED and resumable, and launching the sweep again resumes it.
  grep -q "timed-out too many times" "$tmp/log/timelimit$launch.log" ||
    { tail -n 30 "$tmp/log/timelimit$launch.log" >&2; die "the time-limited sweep failed (above)"; }
  [ "$launch" != 3 ] || die "the job did not finish in 3 launches of its sweep: too busy a machine?"
  log "   its requeues ran out before it finished; launching the sweep again resumes it"
done
# every attempt of the job logs "Starting with JobEnvironment" once, and each signal "Caught signal"
attempts=$(cat "$tmp"/timelimit*/.submitit/*/*_log.out | grep -c "^submitit INFO .* - Starting with " || true)
signals=$(cat "$tmp"/timelimit*/.submitit/*/*_log.err | grep -c "^submitit WARNING .* - Caught signal SIGUSR2" || true)
[ "$attempts" -gt "$launch" ] || die "the job was never requeued: $attempts attempt(s) in $launch launch(es)"
finished=$(runs | awk '$2 == 1000 && $3 == "FINISHED"') || die "could not read the runs from $store"
[ "$(echo "$finished" | grep -c .)" = 1 ] || die "expected one FINISHED run of the job, found: $(runs | cut -c 1-60)"
read -r _ _ _ resumed steps <<<"$finished"
[ "$resumed" != - ] || die "the FINISHED run has no resumed_from_epoch tag: it was never resumed"
last=${steps##* }
[ "$steps" = "$(seq -s ' ' 1 "$last")" ] || die "the run's train/loss steps are '$steps', not every epoch once"
log "   signalled $signals time(s), $attempts attempts in $launch launch(es) of the sweep: FINISHED in the same run"
log "   (last resumed from epoch $resumed), epochs 1 to $last logged once each"
;; esac

case " $CASES " in *" c "*)
log "c. a tuning study drawn by two SLURM jobs at once"
sweep "$tmp/log/tune.log" experiment=tune_table1 hydra.sweeper.part=null 'hydra.sweeper.params={model:mlp2}' \
  tune.workers=2 hydra.launcher.cpus_per_task=1 tune.budget=10 tune.min_epochs=1 tune.max_epochs=3 tune.reduction_factor=2 \
  ++trainer.limit_train_batches=10 ++trainer.limit_val_batches=5 hydra.sweep.dir="$tmp/tune" ||
  { tail -n 30 "$tmp/log/tune.log" >&2; die "the tuning failed or took too long (above)"; }
"$PY" - "$store" "$tmp/tuning.journal" <<'PYEOF' || die "the tuning study is not as expected (above)"
import sys
import optuna
from mlflow import MlflowClient
from optuna.storages.journal import JournalFileBackend

storage = optuna.storages.JournalStorage(JournalFileBackend(sys.argv[2]))
(summary,) = optuna.study.get_all_study_summaries(storage)
study = optuna.load_study(study_name=summary.study_name, storage=storage)
done = study.get_trials()
spent = sum(int(t.user_attrs["epochs"]) for t in done)
workers = {t.user_attrs["pid"] for t in done}
client = MlflowClient(sys.argv[1])
runs = client.search_runs([client.get_experiment_by_name("slurm-local_tuning").experiment_id])
numbers = sorted(int(run.data.tags["tuning.trial"]) for run in runs)
problems = [*(["a trial is not COMPLETE or PRUNED: %s" % [t.state.name for t in done]]
              if any(t.state.name not in ("COMPLETE", "PRUNED") for t in done) else []),
            *([f"{spent} epochs spent, not the budget of 10"] if spent != 10 else []),
            *([f"trials trained by {len(workers)} worker(s), not 2"] if len(workers) != 2 else []),
            *([f"runs of trials {numbers}, not each of {[t.number for t in done]} once"]
              if numbers != [t.number for t in done] else []),
            *([f"a run is not FINISHED"] if any(run.info.status != "FINISHED" for run in runs) else [])]
ended = [key for key in client.get_experiment_by_name("slurm-local_tuning").tags if key.startswith("tuning.ended.")]
problems += [f"the study is not marked ended once in the store: {ended}"] if len(ended) != 1 else []
print("\n".join(problems) or f"{len(done)} trials by 2 workers, {spent} epochs, best {study.best_value:.2f}, ended")
sys.exit(1 if problems else 0)
PYEOF
log "   one study, two workers, every trial once and the budget spent (${SECONDS} s so far)"
;; esac

log "OK in ${SECONDS} s"
