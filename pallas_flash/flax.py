"""Flax integration: an ``attention_fn`` for ``nnx.MultiHeadAttention`` and linen's
``MultiHeadDotProductAttention``, and the two layers with it preinstalled.

Swapping attention in an existing model is one line::

    from pallas_flash.flax import attention_fn
    attn = nnx.MultiHeadAttention(num_heads=12, in_features=768, attention_fn=attention_fn, rngs=rngs)
    y = attn(x, is_causal=True)       # nnx passes is_causal through to the attention_fn

    # linen has no is_causal argument: bake it into the function instead of building a causal mask
    attn = nn.MultiHeadDotProductAttention(num_heads=12, attention_fn=make_attention_fn(is_causal=True))

or use `MultiHeadAttention` / `MultiHeadDotProductAttention` from this module in place of flax's.

What it does with each keyword flax passes:

* ``is_causal``: handled by the kernel (no mask array is built).
* ``mask`` / ``bias``: honoured, by the kernel too (it reads them tile by tile in their broadcast
  shape; a full ``[T, S]`` mask array still costs O(T*S) memory to hold, and a mask array disables
  the kernel's mask-free fast path, so prefer ``is_causal`` to a causal mask).
* ``dtype``: query, key and value are cast to it (flax's own attention does the same promotion).
* ``dropout_rate`` with ``deterministic=False``: NotImplementedError -- the fused kernel never forms
  the attention-probability matrix that dropout would act on.
* ``module`` (flax's ``sow_weights=True``): NotImplementedError, for the same reason.
* ``precision``, ``broadcast_dropout``, ``dropout_rng``: accepted and ignored (the kernel
  accumulates in float32 whatever the input dtype; without dropout the others have no meaning).
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import linen, nnx

from pallas_flash.api import IMPLEMENTATIONS, dot_product_attention
from pallas_flash.config import FlashConfig

__all__ = ["attention_fn", "make_attention_fn", "MultiHeadAttention", "MultiHeadDotProductAttention",
           "SelfAttention"]


def _flatten_batch(x, batch_dims: tuple[int, ...]):
    """[batch..., rest...] -> [prod(batch), rest...]: the kernel API takes exactly one batch dim."""
    return x.reshape((-1,) + x.shape[len(batch_dims):])


def _flatten_mask_batch(m, batch_dims: tuple[int, ...]):
    """A mask/bias [batch... (or broadcastable), N|1, T|1, S|1] -> [prod(batch) or 1, N|1, T|1, S|1]."""
    m = jnp.asarray(m)
    m = m.reshape((1,) * (len(batch_dims) + 3 - m.ndim) + m.shape)
    lead = m.shape[:-3]
    if all(d == 1 for d in lead):
        return m.reshape((1,) + m.shape[-3:])
    m = jnp.broadcast_to(m, batch_dims + m.shape[-3:])
    return m.reshape((-1,) + m.shape[-3:])


def attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    is_causal: bool = False,
    *,
    implementation: str | None = None,
    config: FlashConfig | None = None,
):
    """`flax.nnx.dot_product_attention`'s signature, computed by `pallas_flash.dot_product_attention`.

    Args:
      query: ``[batch..., T, N, H]``; key, value: ``[batch..., S, K, H]`` (K divides N).
      bias, mask: broadcastable to ``[batch..., N, T, S]``; mask is boolean, True = attend.
      is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned, as in jax.nn).
      dtype: computation dtype; query, key and value are cast to it (their promoted type when None).
      implementation: passed to `pallas_flash.dot_product_attention` (None, "triton" or "xla").
      config: kernel tuning, passed through.
      Other arguments: see the module docstring.

    Returns:
      ``[batch..., T, N, H]``.

    Raises:
      NotImplementedError: active dropout, ``module`` (sow_weights), or arrays the chosen
        implementation cannot take.
      ValueError: inputs `pallas_flash.dot_product_attention` rejects.
    """
    del broadcast_dropout, dropout_rng, precision
    if dropout_rate > 0.0 and not deterministic:
        raise NotImplementedError(
            f"pallas_flash attention_fn got dropout_rate={dropout_rate} with deterministic=False: the "
            "fused kernel never materialises the attention probabilities, so it cannot drop them. "
            "Set dropout_rate=0.0 (GPT-style models train without attention dropout), pass "
            "deterministic=True, or use flax's default attention_fn for this layer.")
    if module is not None:
        raise NotImplementedError(
            "pallas_flash attention_fn cannot sow attention weights (sow_weights=True): the fused "
            "kernel never forms them. Use flax's default attention_fn to inspect attention weights.")
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if not (query.ndim == key.ndim == value.ndim) or query.ndim < 3:
        raise ValueError("query, key and value must be [batch..., length, heads, head_dim] with the "
                         f"same rank, got {query.shape}, {key.shape}, {value.shape}")
    compute = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query, key, value)
    query, key, value = query.astype(compute), key.astype(compute), value.astype(compute)

    batch_dims = query.shape[:-3]
    if key.shape[:-3] != batch_dims or value.shape[:-3] != batch_dims:
        raise ValueError(f"query, key and value must share batch dims, got {query.shape}, "
                         f"{key.shape}, {value.shape}")
    if len(batch_dims) > 1:
        query = _flatten_batch(query, batch_dims)  # [prod(batch), T, N, H]
        key = _flatten_batch(key, batch_dims)  # [prod(batch), S, K, H]
        value = _flatten_batch(value, batch_dims)
        bias = None if bias is None else _flatten_mask_batch(bias, batch_dims)
        mask = None if mask is None else _flatten_mask_batch(mask, batch_dims)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            # Flax masks are often float 0/1 (nn.make_attention_mask's default dtype).
            mask = mask != 0
    out = dot_product_attention(query, key, value, bias, mask, is_causal=bool(is_causal),
                                implementation=implementation, config=config)
    return out.reshape(batch_dims + out.shape[-3:])  # [batch..., T, N, H]


def make_attention_fn(*, is_causal: bool = False, implementation: str | None = None,
                      config: FlashConfig | None = None) -> Callable[..., Any]:
    """`attention_fn` with a fixed implementation/config, and causal masking switched on.

    ``is_causal=True`` is meant for linen, whose attention layers have no ``is_causal`` argument:
    it replaces ``nn.make_causal_mask`` (a mask array would cost O(T*S) memory and the kernel's
    mask-free fast path). It ORs
    with the ``is_causal`` an nnx layer passes, so do not combine it with nnx's ``decode=True``
    cache, whose single-query steps must not be causally masked.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")

    causal = bool(is_causal)

    # A plain signature (no **kwargs, no keyword-only extras): linen filters the keywords it passes
    # by inspect.signature, so every flax keyword must be spelled out here.
    def fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
           dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
           is_causal=False):
        return attention_fn(query, key, value, bias, mask, broadcast_dropout, dropout_rng,
                            dropout_rate, deterministic, dtype, precision, module,
                            is_causal=is_causal or causal, implementation=implementation,
                            config=config)

    fn.__doc__ = attention_fn.__doc__
    return fn


class MultiHeadAttention(nnx.MultiHeadAttention):
    """`flax.nnx.MultiHeadAttention` with `attention_fn` as the default attention function."""

    def __init__(self, *args, attention_fn: Callable[..., Any] = attention_fn, **kwargs):
        super().__init__(*args, attention_fn=attention_fn, **kwargs)


class MultiHeadDotProductAttention(linen.MultiHeadDotProductAttention):
    """`flax.linen.MultiHeadDotProductAttention` with `attention_fn` as the default attention function.

    For causal self-attention pass ``attention_fn=make_attention_fn(is_causal=True)`` rather than a
    causal mask, so the call stays on the kernel.
    """

    attention_fn: Callable[..., Any] = attention_fn


class SelfAttention(linen.SelfAttention):
    """`flax.linen.SelfAttention` with `attention_fn` as the default attention function."""

    attention_fn: Callable[..., Any] = attention_fn
