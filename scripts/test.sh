#!/usr/bin/env bash
# Run every test of dgbit-bus: set-up, format and lint checks, the workspace's
# unit and integration tests (real NNG sockets, Python peers), every example
# built, and a short smoke pass of the benchmark.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export PATH="$root/.venv/bin:$PATH"

# In CI (root, on a machine that has network namespaces) the multi-host and
# access-control tests must run, not skip.
if [ "${CI:-}" = "true" ] && [ "$(id -u)" = "0" ]; then
  export DGBIT_REQUIRE_NETNS=1 DGBIT_REQUIRE_ROOT=1
fi

cargo build --workspace --all-targets
# Keep the output, then close with one line totalling every test binary.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set -o pipefail
cargo test --workspace -- --test-threads=2 2>&1 | tee "$log"
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
