#!/usr/bin/env bash
# Prepare a fresh machine (Rust toolchain, gcc and python3 present) for
# building and testing dgbit-bus. Idempotent; safe to source or run.
#
# - cmake (the bundled NNG build needs it): from PyPI into .venv when the
#   machine has none.
# - pynng (the Python peers in the tests and examples): into .venv.
#
# Afterwards .venv/bin is first on PATH for the calling script.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

if [ ! -x "$venv/bin/python3" ]; then
  echo "setup: creating $venv" >&2
  python3 -m venv "$venv"
fi

need=()
"$venv/bin/python3" -c "import pynng" 2>/dev/null || need+=("pynng")
if ! command -v cmake >/dev/null 2>&1 && [ ! -x "$venv/bin/cmake" ]; then
  need+=("cmake")
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]} from PyPI into .venv" >&2
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "${need[@]}"
fi
