#!/usr/bin/env bash
# Set up a fresh machine and run the test suite: a virtualenv with qbench and its test
# extras, Debian's chromium for the leaderboard's browser tests, ruff (lint and format
# check), then pytest in two worker processes (pytest-xdist; a test file stays on one worker,
# so its module fixtures are built once): most tests train or evaluate on one thread, so two
# workers keep a 2-core machine busy. QBENCH_TEST_WORKERS changes the count (0: one process).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/test_suite.py -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing Debian's chromium for the browser tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: /usr/bin/chromium is missing (apt-get install chromium); the browser tests will be skipped"
  fi
fi
# lint and format first: a few seconds, and the same check CI applies
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -n "${QBENCH_TEST_WORKERS:-2}" --dist loadfile "$@"
