#!/usr/bin/env bash
# Runs the test suite: the platform environment's pytest over tests/ (extra arguments are passed on), then
# the encrypted environment's own unit tests (code that must import without the platform's packages).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
platform="$(scripts/setup_env.sh platform)"
encrypted="$(scripts/setup_env.sh encrypted)"
export PYTHONPATH="$repo" TF_CPP_MIN_LOG_LEVEL=3
status=0
"$platform/bin/python" -m pytest "$@" || status=$?
if [ -d tests/encrypted_env ]; then
  "$encrypted/bin/python" -m pytest -c tests/encrypted_env/pytest.ini tests/encrypted_env "$@" || { s=$?; [ $s -eq 5 ] || status=$s; }
fi
exit $status
