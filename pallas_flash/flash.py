"""The differentiable Pallas attention op: forward kernel + FlashAttention-2 backward as a custom_vjp.

The residuals are O and the base-2 log-sum-exp only (plus the inputs), so training memory stays
O(T * H) per head: nothing of size T * S is ever saved or rebuilt in HBM.
"""

from __future__ import annotations

import functools

import jax

from pallas_flash.backward import flash_backward
from pallas_flash.config import FlashStatics
from pallas_flash.forward import flash_forward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_attention(statics: FlashStatics, q, k, v, q_lengths, kv_lengths, segments, bias, mask):
    """Returns ``(out, lse2)``; see `forward.flash_forward`."""
    return flash_forward(q, k, v, q_lengths, kv_lengths, segments, bias, mask, statics=statics)


def _flash_attention_fwd(statics, q, k, v, q_lengths, kv_lengths, segments, bias, mask):
    out, lse = flash_forward(q, k, v, q_lengths, kv_lengths, segments, bias, mask, statics=statics)
    return (out, lse), (q, k, v, q_lengths, kv_lengths, segments, bias, mask, out, lse)


def _flash_attention_bwd(statics, residuals, cotangents):
    q, k, v, q_lengths, kv_lengths, segments, bias, mask, out, lse = residuals
    # The log-sum-exp is returned as a residual, not as a differentiable output (as in jax.nn),
    # so its cotangent is ignored.
    d_out, _ = cotangents
    dq, dk, dv, dbias = flash_backward(q, k, v, q_lengths, kv_lengths, segments, bias, mask, out,
                                       lse, d_out, statics=statics)
    # Integer and boolean inputs (lengths, segment ids, the mask) have no cotangent.
    return dq, dk, dv, None, None, None, dbias, None


flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)
