#!/usr/bin/env bash
# The test suite: on CPU the kernels run in Pallas interpret mode and `gpu`-marked tests skip.
source "$(dirname "$0")/env.sh"
# Tests take 0.01 to 40 s each (interpret mode), so an idle worker steals queued tests from the
# busy one (`--dist worksteal`) and the two finish together. A normal run takes nine to eleven
# minutes on two cores, the environment's creation included. Past fifteen, something hangs (the
# Mosaic GPU interpreter once deadlocked on too small an XLA:CPU thread pool, which
# tests/conftest.py now sizes): the run is aborted with the Python stacks printed rather than left
# to hang.
exec timeout -s ABRT 900 python -m pytest -q -n 2 --dist worksteal tests "$@"
