#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for the Slurm tests: munged, slurmctld and two
# slurmd (nodes n1 and n2, two CPUs each) from Debian's packages, configured under DIR.
#   slurm_cluster.sh start DIR   writes DIR/slurm.conf, starts the daemons, waits for both nodes
#   slurm_cluster.sh stop DIR    stops the daemons it started
# Clients find the cluster with SLURM_CONF=DIR/slurm.conf. Both nodes share this machine's
# network, as Debian's build allows (several slurmd on one host, each on its own port).
set -euo pipefail
cmd=${1:?start or stop}
dir=$(realpath -m "${2:?directory}")
ctld_port=${RTRAIN_SLURM_PORT:-16817}

stop() {
  for pidfile in "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid "$dir"/slurmctld.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  # munged serves any other user of munge on this machine: stopped only if this script started it.
  if [ -f "$dir/munged.ours" ]; then
    runuser -u munge -- munged --stop >/dev/null 2>&1 || true
    rm -f "$dir/munged.ours"
  fi
  return 0
}

if [ "$cmd" = stop ]; then
  stop
  exit 0
fi

for tool in slurmctld slurmd munged sinfo; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install slurm-wlm munge" >&2; exit 3; }
done
mkdir -p "$dir/state" "$dir/spool"
host=$(hostname)
cat > "$dir/slurm.conf" <<EOF
ClusterName=rtraintest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((ctld_port + 1)) CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((ctld_port + 2)) CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$dir/slurm.conf"

# munge: the key the package made, or a new one; the daemon runs as the munge user.
if ! munge -n >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  runuser -u munge -- munged
  touch "$dir/munged.ours"
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
fi

slurmctld
for node in n1 n2; do
  mkdir -p "$dir/spool/$node"
  slurmd -N "$node"
done
for _ in $(seq 100); do
  idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
  [ "$idle" -ge 2 ] && exit 0
  sleep 0.2
done
echo "the nodes did not come up:" >&2
sinfo -N >&2 || true
tail -n 20 "$dir"/*.log >&2 || true
exit 1
