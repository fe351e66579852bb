#!/usr/bin/env bash
# Set-up + the whole test suite: the Python requirements, then (as root on Debian) the headless browser that
# tests/test_serve.py drives; runs on both cores with three pytest-xdist workers: while one waits (on a server, a
# timeout, a rendezvous or the shared model) the other two keep the cores busy.
#   bash tests/run.sh                 # everything
#   bash tests/run.sh -k metrics      # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt -r requirements-test.txt
if { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; } && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null; then
  (apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)) \
    >/dev/null || echo "chromium not installed: the browser test will be skipped"
fi
exec python -m pytest -q -n 3 --dist loadgroup tests "$@"  # loadgroup: the Milvus tests share one server
