#!/usr/bin/env bash
# The test suite: on CPU the kernels run in Pallas interpret mode and `gpu`-marked tests skip.
source "$(dirname "$0")/env.sh"
status=0
python -m pytest -q -n 2 tests --ignore=tests/test_mosaic.py "$@" || status=$?

# The Mosaic GPU interpreter's tests run in one process after the rest. Its warpgroup threads
# stall now and then, always in the process's first kernel so far (threads blocked inside XLA:CPU
# executions with no kernel barrier left to pass; NOTES.md, "CPU suite"). A stall, which `timeout`
# turns into exit code 124 after a thread dump (SIGABRT), gets one more attempt; a failure never
# does. A normal run takes 85-140 s on two cores.
mosaic() { timeout -s ABRT 300 python -m pytest -q tests/test_mosaic.py "$@"; }
rc=0
mosaic "$@" || rc=$?
if [ "$rc" -eq 124 ]; then
  echo "tests/test_mosaic.py stalled for 300 s (thread dump above); running it once more"
  rc=0
  mosaic "$@" || rc=$?
fi
[ "$rc" -eq 0 ] || status=$rc
exit "$status"
