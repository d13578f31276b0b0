#!/usr/bin/env bash
# A real two-node Ray cluster on this machine, token authentication on: a head node (GCS, job server
# and dashboard on 127.0.0.1) and one worker node joined with `ray start --address`, each with its
# own CPUs and object store.
#
#   deploy/local_cluster.sh up      # start it; prints the exports a client needs
#   eval "$(deploy/local_cluster.sh env)"
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- vaegan run --config pipelines/configs/smoke.yaml
#   deploy/local_cluster.sh down    # stop it: this cluster's processes only, not every Ray on the machine
#
# The token lives in $VAEGAN_CLUSTER_DIR/auth_token (mode 600, made on first `up`), never in a command
# line or a log. Settings, from the environment: VAEGAN_CLUSTER_DIR (default ~/.vaegan/local-cluster),
# HEAD_CPUS / WORKER_CPUS (default 1 each, so a 2-worker Train run spans both nodes), OBJECT_STORE_MB
# (per node, default 512), GCS_PORT (default 6390), DASHBOARD_PORT (default 8265).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${VAEGAN_CLUSTER_DIR:-$HOME/.vaegan/local-cluster}"
GCS_PORT="${GCS_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
OBJECT_STORE_BYTES=$(( ${OBJECT_STORE_MB:-512} * 1024 * 1024 ))
# Job entrypoints inherit the nodes' PATH: put the project's venv first so `vaegan` resolves.
if [[ -x "$ROOT/.venv/bin/ray" ]]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"

ensure_token() {
  mkdir -p "$STATE"
  if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
  fi
}

# Both nodes joined, and each node's dashboard agent registered: the job server hands a submission to the head
# node's agent and refuses it ("No available agent to submit job") when that agent is not up within 10 s, which
# on a busy 2-core machine it can still be for a while after `ray start` returns.
wait_for_nodes() {
  python - "$1" <<'EOF'
import sys, time
import ray
from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX
from ray.experimental.internal_kv import _internal_kv_get
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)


def waiting_for() -> str:
    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    if len(alive) < 2:
        return "the worker node to join"
    if not all(_internal_kv_get(DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX + node, namespace=KV_NAMESPACE_DASHBOARD)
               for node in alive):
        return "the nodes' dashboard agents to register"
    return ""


deadline = time.time() + 90
while (what := waiting_for()):
    if time.time() > deadline:
        sys.exit(f"waited 90 s for {what}")
    time.sleep(0.5)
print(f"cluster up: {ray.cluster_resources()}")
EOF
}

# Each node is started in a session of its own (setsid), whose id is kept in $STATE/<node>.sid: Ray's daemons
# and workers stay in it, so `down` stops this cluster's processes and nothing else. `ray stop` would stop every
# Ray of this user on the machine: a pipeline's own local Ray, another cluster, a test's.
# Each node's dashboard agent gets a free port of its own: every Ray node's agent (a local `ray.init`'s too)
# listens on 52365 unless told otherwise, and an agent that loses that race serves no HTTP, so the job server
# finds no agent to hand a submission to.
start_node() {
  local node=$1; shift
  local agent_port
  agent_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  setsid --wait bash -c 'echo $$ > "$0"; exec ray start "$@"' "$STATE/$node.sid" "$@" \
    --dashboard-agent-listen-port="$agent_port" > "$STATE/$node.log" 2>&1 || { cat "$STATE/$node.log" >&2; return 1; }
}

# An `up` that fails half-way (the worker cannot join, an agent never registers) stops what it started, so
# that no half-cluster keeps its ports and CPUs and the next `up` starts clean.
abort_up() {
  stop_cluster || true
  echo "cluster not started; the nodes that did start are stopped (logs: $STATE/*.log)" >&2
  exit 1
}

live_pids() {  # the live (not zombie) processes of the sessions in $STATE/*.sid
  local sid
  for sid in $(cat "$STATE"/*.sid 2>/dev/null); do
    { ps -s "$sid" -o pid=,stat= || true; } | awk '$2 !~ /^Z/ {print $1}'  # ps fails once a session is empty
  done
}

signal_live() {  # send signal $1 to every live process of the cluster's sessions
  local pids
  pids=$(live_pids)
  [[ -n "$pids" ]] && kill "-$1" $pids 2>/dev/null || true
}

gone_within() {  # whether every process of the cluster's sessions is gone within $1 seconds
  local deadline=$((SECONDS + $1))
  while [[ -n "$(live_pids)" ]]; do
    (( SECONDS < deadline )) || return 1
    sleep 0.5
  done
}

stop_cluster() {
  signal_live TERM
  # 5 s of grace: the workers end on SIGTERM, while Ray's GCS, raylets, monitor and runtime-env agents wait for
  # SIGKILL, which is also how `ray stop` ends them after its grace period.
  gone_within 5 || signal_live KILL
  # A killed process stays in the process table, running its exit, for a moment after the signal is sent:
  # `down` returns once the kernel has reaped them all, so a following `up` or check sees the cluster gone.
  if ! gone_within 10; then
    echo "cluster processes still running 10 s after SIGKILL: $(live_pids | tr '\n' ' ')" >&2
    return 1
  fi
  rm -f "$STATE"/*.sid
}

print_env() {
  echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
}

case "${1:-}" in
  up)
    ensure_token
    start_node head --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --num-cpus="${HEAD_CPUS:-1}" --num-gpus=0 --object-store-memory="$OBJECT_STORE_BYTES" --disable-usage-stats \
      || abort_up
    # Its own temp dir, so the two nodes' log monitors do not both forward the same worker logs.
    start_node worker --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 --temp-dir="$STATE/worker" \
      --num-cpus="${WORKER_CPUS:-1}" --num-gpus=0 --object-store-memory="$OBJECT_STORE_BYTES" --disable-usage-stats \
      || abort_up
    wait_for_nodes "$GCS_PORT" || abort_up
    echo "job server: http://127.0.0.1:$DASHBOARD_PORT   (clients need:)"
    print_env
    ;;
  down)
    stop_cluster
    echo "cluster down"
    ;;
  env)
    print_env
    ;;
  *)
    echo "usage: $0 up|down|env" >&2
    exit 2
    ;;
esac
