#!/usr/bin/env bash
# The SIGKILL test of tests/integration/test_lifecycle.py N times in a row (default 20) with every CPU
# kept busy by a shell busy loop, as on the loaded CI machine where it failed (issue 23, item 10).
# Slow (the demo run once, then ~1 min a round): not part of `make test`. Stops at the first failure.
#   bench/sigkill_under_load.sh [N]
# Other helpers on a shared machine: run it under `flock /tmp/heavy.lock`.
set -u
cd "$(dirname "$0")/.."
n="${1:-20}"
busy=()
for _ in $(seq "$(nproc)"); do (while :; do :; done) & busy+=($!); done
trap 'kill "${busy[@]}" 2>/dev/null' EXIT
echo "busy loops: ${#busy[@]} on $(nproc) CPU(s); ${n} rounds"
t0=$(date +%s)
.venv/bin/python -m pytest tests/integration/test_lifecycle.py -p bench.repeat_plugin --repeat "$n" -x -q -s \
    -k test_sigkill_leaves_no_ray_processes_and_status_says_stale -p no:cacheprovider \
    2>&1 | grep -E "SIGKILL: |passed|failed|Error|assert" 
rc=${PIPESTATUS[0]}
echo "exit ${rc}; $(( $(date +%s) - t0 )) s in all"
exit "$rc"
