#!/usr/bin/env bash
# All-reduce across simulated hosts joined by a rate-limited link: the flat TCP ring over every
# rank beside the hierarchical all-reduce (shared memory inside a host, a ring between hosts).
# Each host is a network namespace with one address; their link (a bridge in a namespace of its
# own) carries LINK_RATE each way, as a network between machines would, while the ranks of one
# host share its memory. Needs root and iproute2.
#   bash bench/multi_host_allreduce.sh                 # 8 ranks on 2 hosts, 1gbit link
#   RANKS=4 HOSTS=2 LINK_RATE=2gbit bash bench/multi_host_allreduce.sh
# The hierarchical all-reduce sends (H-1)/H of the buffer over the link where the flat ring sends
# (N-1)/N: two hosts of L ranks allow at most (2L-1)/L (1.5x for 2 ranks a host, 1.75x for 4).
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS=${RANKS:-8}
HOSTS=${HOSTS:-2}
LINK_RATE=${LINK_RATE:-1gbit}
MAX_MIB=${MAX_MIB:-64}
ITERS=${ITERS:-3}
[ "$(id -u)" -eq 0 ] || { echo "needs root (to make network namespaces)" >&2; exit 2; }
command -v ip >/dev/null && command -v tc >/dev/null || { echo "needs iproute2 (ip, tc)" >&2; exit 2; }
bash scripts/setup-libtorch.sh >/dev/null
export LD_LIBRARY_PATH="$PWD/.libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo build --release -q --bin rtrain --bin rtrain-worker

tag="rtb$$"
cleanup() {
  for i in $(seq 0 $((HOSTS - 1))); do ip netns del "${tag}h$i" 2>/dev/null || true; done
  ip netns del "${tag}b" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "${tag}b"
ip -n "${tag}b" link add br0 type bridge
ip -n "${tag}b" link set br0 up
spaces=()
for i in $(seq 0 $((HOSTS - 1))); do
  ns="${tag}h$i"
  ip netns add "$ns"
  ip link add eth0 netns "$ns" type veth peer name "p$i" netns "${tag}b"
  ip -n "${tag}b" link set "p$i" master br0
  ip -n "${tag}b" link set "p$i" up
  ip -n "$ns" addr add "10.98.0.$((i + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  # The host's link, each way: its sends leave through eth0, what it receives through p$i.
  ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$LINK_RATE" burst 256kb latency 50ms
  ip netns exec "${tag}b" tc qdisc add dev "p$i" root tbf rate "$LINK_RATE" burst 256kb latency 50ms
  spaces+=("$ns=10.98.0.$((i + 1))")
done
echo "simulated hosts: ${spaces[*]} (link: $LINK_RATE each way)"
netns=$(IFS=,; echo "${spaces[*]}")
target/release/rtrain bench allreduce --ranks "$RANKS" --hosts "$HOSTS" --netns "$netns" \
  --max-mib "$MAX_MIB" --iters "$ITERS"
