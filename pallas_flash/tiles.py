"""Bounds-checked tile loads and stores shared by every kernel.

Pallas' Triton backend turns a ref slice into raw pointer arithmetic with no bounds check, so a tile
that overhangs the sequence end or the real head dim must carry an explicit mask. Interpret mode pads
such tiles with NaN, which makes a forgotten mask fail the CPU tests loudly.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu


def _bounds_mask(shape, first_row, valid_rows, valid_cols, first_col=None):
    mask = None
    if valid_rows is not None:
        rows = first_row + jnp.arange(shape[0], dtype=jnp.int32)
        mask = rows < valid_rows
        if len(shape) == 2:
            mask = mask[:, None]
    if valid_cols is not None and first_col is not None:
        # A column window at a traced offset: every tile needs the check.
        cols = (first_col + jnp.arange(shape[-1], dtype=jnp.int32) < valid_cols)[None, :]
        mask = cols if mask is None else mask & cols
    elif valid_cols is not None and valid_cols < shape[-1]:
        cols = (jnp.arange(shape[-1], dtype=jnp.int32) < valid_cols)[None, :]
        mask = cols if mask is None else mask & cols
    return None if mask is None else jnp.broadcast_to(mask, shape)


def load_tile(view, *, first_row=0, valid_rows=None, valid_cols=None, other=0.0, first_col=None):
    """Loads a 1-D or 2-D ref view; rows at ``first_row + r >= valid_rows`` and columns at or past
    ``valid_cols`` (counted from ``first_col`` when given) read as ``other``. ``None`` bounds cost
    nothing."""
    mask = _bounds_mask(view.shape, first_row, valid_rows, valid_cols, first_col)
    if mask is None:
        return view[...]
    return plgpu.load(view, mask=mask, other=other)


def store_tile(view, value, *, first_row=0, valid_rows=None, valid_cols=None, first_col=None):
    """Stores into a ref view, skipping the rows and columns that `load_tile` would mask."""
    mask = _bounds_mask(view.shape, first_row, valid_rows, valid_cols, first_col)
    if mask is None:
        view[...] = value
    else:
        plgpu.store(view, value, mask=mask)
