#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests that submit real jobs.
#   scripts/slurm-local.sh install   # Debian's slurm-wlm and munge (root, apt)
#   scripts/slurm-local.sh start     # munged + slurmctld + slurmd, partition "debug", all CPUs
#   scripts/slurm-local.sh stop
# Seen working here: SlurmUser=root, proctrack/linuxproc, task/none, select/cons_tres.
set -euo pipefail
ACTION=${1:-start}
STATE=${TL_SLURM_STATE:-/tmp/tl-slurm}
CONF_DIR=/etc/slurm

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
}

start() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p "$STATE"/{ctld,d,log} /run/munge /var/lib/munge /var/log/munge "$CONF_DIR"
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged" 2>/dev/null || /usr/sbin/munged --force
  cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=tl-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
JobRequeue=1
MinJobAge=600
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -c
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd -c
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "slurm-local: node $host up ($cpus CPUs)"
      return 0
    fi
    scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm-local: the node did not come up; see $STATE/log/" >&2
  sinfo >&2 || true
  return 1
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
}

case "$ACTION" in
  install) install ;;
  start) install; start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
