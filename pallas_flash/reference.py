"""Pure-jnp attention: the executable specification.

It is the test oracle, the CPU fallback (``implementation="xla"``) and the debug backward. It
materialises the full ``[B, N, T, S]`` logits, so its memory is O(T*S): use it for checking, not for
long sequences. All arithmetic is float32 (or float64 for float64 inputs); the output comes back in
the input dtype, and the log-sum-exp in the natural log, float32, laid out ``[B, T, N]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_flash.masking import MASK_VALUE


def visibility(T: int, S: int, *, is_causal=False, window=None, q_lengths=None, kv_lengths=None,
               q_segment_ids=None, kv_segment_ids=None):
    """The boolean ``[B or 1, 1, T, S]`` mask of `masking`'s rules, built in full."""
    i = jnp.arange(T)[:, None]
    j = jnp.arange(S)[None, :]
    vis = jnp.ones((T, S), bool)
    if is_causal:
        vis &= j <= i
    if window is not None:
        left, right = window
        vis &= (j >= i - left) & (j <= i + right)
    vis = vis[None, None]
    if q_lengths is not None:
        vis = vis & (i < q_lengths[:, None, None])[:, None]
    if kv_lengths is not None:
        vis = vis & (j < kv_lengths[:, None, None])[:, None]
    if q_segment_ids is not None:
        vis = vis & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    return vis


def soft_capped(logits, soft_cap):
    """``soft_cap * tanh(logits / soft_cap)``; the identity when ``soft_cap`` is None."""
    return logits if soft_cap is None else soft_cap * jnp.tanh(logits / soft_cap)


# Logits (natural units, bias included) at or below this count as masked: half the kernels' MASK_VALUE,
# which they use in base 2 (hence the log2(e)).
BIAS_MASK_THRESHOLD = 0.5 * MASK_VALUE / math.log2(math.e)


def attention(query, key, value, bias=None, mask=None, *, scale: float, is_causal=False,
              window=None, q_lengths=None, kv_lengths=None, soft_cap=None, q_segment_ids=None,
              kv_segment_ids=None):
    """Returns ``(out, lse)``. Inputs as validated by the API: 4-D, K/V heads dividing query heads.

    Logits are ``soft_cap(scale * q . k) + bias``, then masked: the soft cap comes before the bias
    (Gemma 2 order), so a bias can still push a logit past the cap.
    """
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    compute = jnp.promote_types(query.dtype, jnp.float32)
    q = query.astype(compute)
    # The reference may repeat K/V per query head; the kernels never do.
    k = jnp.repeat(key.astype(compute), N // K, axis=2)
    v = jnp.repeat(value.astype(compute), N // K, axis=2)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, precision=jax.lax.Precision.HIGHEST) * scale
    logits = soft_capped(logits, soft_cap)
    if bias is not None:
        logits = logits + bias.astype(compute)
    vis = visibility(T, S, is_causal=is_causal, window=window, q_lengths=q_lengths, kv_lengths=kv_lengths,
                     q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    if mask is not None:
        vis = vis & mask
    if bias is not None:
        # An additive-mask bias (jax.nn's -0.7 * float32 max, finfo.min, -inf) masks its logit, as
        # in the kernels, which clamp at MASK_VALUE: a row of only such logits is empty, not uniform.
        vis = vis & (logits > BIAS_MASK_THRESHOLD)
    vis = jnp.broadcast_to(vis, logits.shape)
    # Softmax without NaNs on empty rows: the max of an empty row is taken as 0 and masked
    # entries are replaced *before* exp so no inf ever meets a zero in the gradient.
    row_max = jnp.max(jnp.where(vis, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    p = jnp.where(vis, jnp.exp(jnp.where(vis, logits, row_max) - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    safe = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("BNTS,BSNH->BTNH", p / safe, v, precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(denom > 0, row_max + jnp.log(safe), -jnp.inf)[..., 0]  # [B, N, T]
    return out.astype(query.dtype), jnp.transpose(lse, (0, 2, 1)).astype(compute)
