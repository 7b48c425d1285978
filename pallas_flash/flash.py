"""The differentiable Pallas attention op: forward kernel + FlashAttention-2 backward as a custom_vjp.

The residuals are O and the base-2 log-sum-exp only (plus the inputs), so training memory stays
O(T * H) per head: nothing of size T * S is ever saved or rebuilt in HBM, except the gradient of a
bias that is differentiated (its [B, N, T, S] logit gradient, reduced over the broadcast dims).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from pallas_flash.backward import flash_backward
from pallas_flash.config import FlashStatics
from pallas_flash.forward import flash_forward
from pallas_flash.mosaic_backward import mosaic_backward
from pallas_flash.mosaic_forward import mosaic_forward


def _mosaic_lengths(q, k, q_lengths, kv_lengths):
    """The Mosaic kernels' ``[2, B]`` int32 (query, key) lengths, clipped to ``[0, T]`` and
    ``[0, S]``; a missing one is the whole length."""
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    full = lambda n: jnp.full((B,), n, jnp.int32)
    return jnp.stack([full(T) if q_lengths is None else jnp.clip(q_lengths, 0, T),
                      full(S) if kv_lengths is None else jnp.clip(kv_lengths, 0, S)]).astype(jnp.int32)


def _forward(statics: FlashStatics, q, k, v, q_lengths, kv_lengths, segments, bias, mask):
    if statics.mosaic is not None:
        # The API sends only calls without segments, bias or mask to the Mosaic kernels.
        lengths = _mosaic_lengths(q, k, q_lengths, kv_lengths) if statics.mosaic.seq_lengths else None
        return mosaic_forward(q, k, v, lengths, statics=statics.mosaic)
    return flash_forward(q, k, v, q_lengths, kv_lengths, segments, bias, mask, statics=statics)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_attention(statics: FlashStatics, q, k, v, q_lengths, kv_lengths, segments, bias, mask):
    """Returns ``(out, lse2)``; see `forward.flash_forward`."""
    return _forward(statics, q, k, v, q_lengths, kv_lengths, segments, bias, mask)


def _value(x):
    return x.value if isinstance(x, CustomVJPPrimal) else x


def _flash_attention_fwd(statics, q, k, v, q_lengths, kv_lengths, segments, bias, mask):
    # symbolic_zeros=True: every array arrives as CustomVJPPrimal(value, perturbed). Only a bias that
    # something differentiates gets the backward's [B, N, T, S] buffer; the residuals carry that
    # decision in their structure (the bias again, or None).
    bias_grad = bias is not None and bias.perturbed
    args = jax.tree.map(_value, (q, k, v, q_lengths, kv_lengths, segments, bias, mask),
                        is_leaf=lambda x: isinstance(x, CustomVJPPrimal))
    out, lse = _forward(statics, *args)
    return (out, lse), (*args, out, lse, args[6] if bias_grad else None)


def _flash_attention_bwd(statics, residuals, cotangents):
    q, k, v, q_lengths, kv_lengths, segments, bias, mask, out, lse, grad_bias = residuals
    # The log-sum-exp is returned as a residual, not as a differentiable output (as in jax.nn),
    # so its cotangent is ignored.
    d_out, _ = cotangents
    if isinstance(d_out, SymbolicZero):
        d_out = jax.numpy.zeros_like(out)
    if statics.mosaic is not None:
        lengths = _mosaic_lengths(q, k, q_lengths, kv_lengths) if statics.mosaic.seq_lengths else None
        dq, dk, dv = mosaic_backward(q, k, v, out, lse, d_out, lengths, statics=statics.mosaic)
        return dq, dk, dv, None, None, None, None, None
    dq, dk, dv, dbias = flash_backward(q, k, v, q_lengths, kv_lengths, segments, bias, mask, out,
                                       lse, d_out, statics=statics, bias_grad=grad_bias is not None)
    # Integer and boolean inputs (lengths, segment ids, the mask) have no cotangent.
    return dq, dk, dv, None, None, None, dbias, None


flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd, symbolic_zeros=True)
