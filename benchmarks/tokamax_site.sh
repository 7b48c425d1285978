#!/usr/bin/env bash
# Installs tokamax (the strongest Pallas peer, an optional baseline) and the pure-Python packages it
# needs next to jax into ./.tokamax, for a GPU machine that has jax but no network: build it where
# pip can reach PyPI, copy the folder along, and put it on the path:
#
#     bash benchmarks/tokamax_site.sh
#     PYTHONPATH=.:.tokamax python -m benchmarks.tune --impl mosaic --baselines --baseline-impls cudnn,tokamax
#
# Needs a python with pip of the GPU machine's version (3.12) and platform (its pydantic-core wheel
# is compiled). jax, jaxlib, numpy and absl-py are left to the GPU machine's own install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
rm -rf .tokamax
"$PY" -m pip install --quiet --no-deps --target .tokamax \
  tokamax==0.0.17 einshape jaxtyping wadler_lindig pydantic pydantic-core typing-inspection \
  annotated-types qwix tqdm immutabledict
# tokamax imports xprof's kernel-stats tool at import time for its own profiler-based timing, which
# these benchmarks never call (they time with `pallas_flash.timing`); xprof itself is a large
# compiled package, so a stub module stands in for it.
mkdir -p .tokamax/xprof/cli
touch .tokamax/xprof/__init__.py .tokamax/xprof/cli/__init__.py
echo "get_kernel_stats_tool = None" > .tokamax/xprof/cli/tools.py
find .tokamax -name __pycache__ -prune -exec rm -rf {} +
echo "tokamax installed in $(pwd)/.tokamax"
