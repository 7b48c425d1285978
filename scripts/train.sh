#!/usr/bin/env bash
# The main job: train GPT-2 with pallas_flash attention and compare against XLA attention.
# On a GPU it trains GPT-2 small in bf16; without one, the tiny model in Pallas interpret mode.
source "$(dirname "$0")/env.sh"
if python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
  exec python -m models.train --attention pallas_flash --config small --bf16 --compare "$@"
fi
exec python -m models.train --attention pallas_flash --compare "$@"
