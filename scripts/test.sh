#!/usr/bin/env bash
# The test suite: on CPU the kernels run in Pallas interpret mode and `gpu`-marked tests skip.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q -n 2 tests "$@"
