#!/usr/bin/env bash
# Install everything the test suite needs into .venv, then run it. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# One pytest-xdist worker per core (at most 4): much of a slow test is single-threaded (process
# start-up, imports, conversion), so two workers on 2 cores finish sooner. QLOCAL_TEST_WORKERS=0
# runs in one process; so does passing your own -n.
workers="${QLOCAL_TEST_WORKERS:-$(python -c 'import os; print(min(4, os.cpu_count() or 1))')}"
parallel=()
if [ "$workers" -gt 1 ] && [[ " $* " != *" -n "* ]]; then
  parallel=(-n "$workers" --dist loadgroup)
fi
set +e
python -m pytest -q -ra ${parallel[@]+"${parallel[@]}"} "$@"  # (bash 3.2 on macOS: no empty-array expansion under set -u)
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
