#!/usr/bin/env bash
# Runs the test suite: the platform environment's pytest over tests/ (extra arguments are passed on), then
# the encrypted environment's pytest over the tests of code that must import without the platform's
# packages (TF-Encrypted 0.9.1 on TF 2.9.1).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
platform="$(scripts/setup_env.sh platform)"
encrypted="$(scripts/setup_env.sh encrypted)"
export PYTHONPATH="$repo" TF_CPP_MIN_LOG_LEVEL=3
status=0
# Two pytest workers (pytest-xdist), a test file per worker at a time (module fixtures stay shared): most tests
# wait on pipeline subprocesses, so two share the 2 cores well. PRIVTRAIN_TEST_WORKERS=0 runs in one process.
workers="${PRIVTRAIN_TEST_WORKERS:-2}"
xdist=()
[ "$workers" != "0" ] && xdist=(-n "$workers" --dist loadfile)
"$platform/bin/python" -m pytest "${xdist[@]}" "$@" || status=$?
"$encrypted/bin/python" -m pytest "$@" tests/encrypted_serving/test_encrypted_format.py \
  tests/encrypted_serving/test_program_local.py || { s=$?; [ $s -eq 5 ] || status=$s; }
exit $status
