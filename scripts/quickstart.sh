#!/usr/bin/env bash
# The main job: a bus, two workers and a client on a temp set of addresses,
# running a batch of backtests on the shipped price data.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export PATH="$root/.venv/bin:$PATH"

cargo run --release --example quickstart -- "$@"
