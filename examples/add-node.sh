#!/usr/bin/env bash
# Adds a fourth node to the running demo cluster (./examples/run-cluster.sh in another
# terminal): an empty database, /tmp/marmot-4.db, that restores the newest snapshot, catches up
# from the stream, and then replicates both ways. Ctrl-C stops it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work=/tmp/marmot-demo

if ! curl -fsS http://127.0.0.1:3011/ready >/dev/null 2>&1; then
  echo "add-node.sh: the demo cluster is not running; start ./examples/run-cluster.sh first" >&2
  exit 1
fi
echo "building marmot (release)..."
(cd "$root" && cargo build --release --quiet -p marmot)
bin="$root/target/release/marmot"

# A snapshot to start from (node 1 takes it; the cluster would take one on its own later).
"$bin" -config "$work/node-1.toml" snapshot save

rm -rf /tmp/marmot-4.db /tmp/marmot-4.db-{wal,shm} /tmp/marmot-4.db-marmot-nats /tmp/marmot-4.db-marmot-snapshots
cat >"$work/node-4.toml" <<'TOML'
db_path = "/tmp/marmot-4.db"
node_id = 4

[replication_log]
replicas = 3

[cluster]
secret_file = "/tmp/marmot-demo/cluster-secret"

[prometheus]
enable = true
bind = "127.0.0.1:3014"
TOML

pid=""
stop() {
  trap - INT TERM EXIT
  if [[ -n $pid ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
}
trap stop INT TERM EXIT

"$bin" -config "$work/node-4.toml" -cluster-addr localhost:4224 \
  -cluster-peers nats://localhost:4221/,nats://localhost:4222/,nats://localhost:4223/ 2>"$work/node-4.log" &
pid=$!
echo "starting node 4 (log in $work/node-4.log)..."
for _ in $(seq 1 300); do
  if curl -fsS http://127.0.0.1:3014/ready >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "node 4 exited; its log:" >&2
    tail -n 20 "$work/node-4.log" >&2
    exit 1
  fi
  sleep 0.2
done
if ! curl -fsS http://127.0.0.1:3014/ready >/dev/null 2>&1; then
  echo "node 4 did not become ready in 60 s; its log:" >&2
  tail -n 20 "$work/node-4.log" >&2
  exit 1
fi
grep -o 'restored from a snapshot.*' "$work/node-4.log" | head -1 || true
cat <<'MSG'

Node 4 joined: /tmp/marmot-4.db holds what the others hold.

  sqlite3 /tmp/marmot-4.db "SELECT count(*) FROM Books;"
  sqlite3 /tmp/marmot-4.db "INSERT INTO Books (id, title, author) VALUES (4000, 'Written on node 4', 'N. Four');"
  sqlite3 /tmp/marmot-1.db "SELECT * FROM Books WHERE id = 4000;"

Press Ctrl-C to stop node 4.
MSG
wait "$pid"
