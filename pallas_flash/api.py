"""`dot_product_attention`: the public entry point, a drop-in for `jax.nn.dot_product_attention`.

All validation happens here, once; the implementations below it trust their inputs.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from pallas_flash import reference
from pallas_flash.config import (FlashConfig, FlashStatics, MOSAIC_SMEM_LIMIT, MosaicConfig, MosaicStatics, dq_split,
                                 default_config, default_mosaic_config, splits_backward)
from pallas_flash.flash import flash_attention
from pallas_flash.masking import MaskSpec

Implementation = Literal["mosaic", "triton", "xla"]
IMPLEMENTATIONS = (None, "mosaic", "triton", "xla")
KERNEL_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
MOSAIC_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
MAX_HEAD_DIM = 256


def _as_4d(x, name: str):
    x = jnp.asarray(x)
    if x.ndim > 4:
        raise ValueError(f"{name} must have at most 4 dimensions, got {name}.shape={x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def check_heads_and_dtypes(**operands):
    """Query heads a multiple of K/V heads, one floating dtype for all: the checks that
    `dot_product_attention` and `decode.decode_attention` share. Keyword names go into the messages;
    the first operand is the query, the second the keys."""
    (q_name, q), (k_name, k) = list(operands.items())[:2]
    N, K = q.shape[-2], k.shape[-2]
    if N % K != 0:
        raise ValueError(f"query heads ({N}) must be a multiple of key/value heads ({K}): "
                         f"{q_name}.shape={q.shape} {k_name}.shape={k.shape}")
    for name, x in operands.items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {name}.dtype={x.dtype}")
    if len({x.dtype for x in operands.values()}) > 1:
        raise ValueError(f"{', '.join(operands)} must share one dtype, got "
                         f"{', '.join(str(x.dtype) for x in operands.values())}")


def _check_broadcastable(x, target, name: str):
    if x.ndim != 4 or any(d not in (1, t) for d, t in zip(x.shape, target)):
        raise ValueError(f"{name} of shape {x.shape} does not broadcast to [B, N, T, S] = {tuple(target)}")


def normalize_window(local_window_size):
    """``w`` or ``(left, right)`` as a ``(left, right)`` pair of non-negative ints (None stays None)."""
    if local_window_size is None:
        return None
    if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
        local_window_size = (local_window_size, local_window_size)
    if (not isinstance(local_window_size, (tuple, list)) or len(local_window_size) != 2
            or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in local_window_size)
            or any(w < 0 for w in local_window_size)):
        raise ValueError("local_window_size must be a non-negative int or a (left, right) pair of "
                         f"non-negative ints, got {local_window_size!r}")
    return (int(local_window_size[0]), int(local_window_size[1]))


def _fits_int32(dtype) -> bool:
    """Integer dtypes whose every value survives the kernels' int32 (uint32 and 64-bit ones would wrap)."""
    return jnp.issubdtype(dtype, jnp.integer) and jnp.iinfo(dtype).bits <= (32 if jnp.issubdtype(
        dtype, jnp.signedinteger) else 16)


def validate_lengths(lengths, batch: int, name: str):
    """``(B,)`` int32 lengths (None stays None); shared with `decode.decode_attention`."""
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,) or not _fits_int32(lengths.dtype):
        raise ValueError(f"{name} must be an int32 (or narrower integer) array of shape (B,) = ({batch},), "
                         f"got {name}.shape={lengths.shape} dtype={lengths.dtype}")
    return lengths.astype(jnp.int32)


def _segment_ids(q_ids, kv_ids, batch: int, T: int, S: int):
    if q_ids is None and kv_ids is None:
        return None
    if q_ids is None or kv_ids is None:
        raise ValueError("query_segment_ids and key_value_segment_ids must be given together (both or "
                         "neither)")
    q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    for name, ids, length in (("query_segment_ids", q_ids, T), ("key_value_segment_ids", kv_ids, S)):
        if ids.shape != (batch, length) or not _fits_int32(ids.dtype):
            raise ValueError(f"{name} must be an int32 (or narrower integer) array of shape "
                             f"(B, {'T' if length == T else 'S'}) = ({batch}, {length}), "
                             f"got {name}.shape={ids.shape} dtype={ids.dtype}")
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def _soft_cap(cap):
    if cap is None:
        return None
    if (isinstance(cap, bool) or not isinstance(cap, (int, float, np.integer, np.floating))
            or not math.isfinite(cap) or cap <= 0):
        raise ValueError(f"logits_soft_cap must be a positive finite Python number or None, got {cap!r}")
    return float(cap)


def _shared_unsupported(query, scale, *, who: str, plural: bool, dtypes, dtype_names: str) -> str | None:
    """The limits both Pallas kernels have: dtype, head dim, a static scale."""
    s = "" if plural else "s"
    if query.dtype not in dtypes:
        return f"{who} support{s} {dtype_names}, got {query.dtype}"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"{who} support{s} head dims up to {MAX_HEAD_DIM}, got {query.shape[-1]}"
    if not isinstance(scale, (int, float, np.floating, np.integer)):
        return f"{who} need{s} a static (Python number) scale"
    return None


def _kernel_unsupported(query, scale) -> str | None:
    """Why the Pallas kernel cannot take this call yet (None: it can)."""
    return _shared_unsupported(query, scale, who="the Pallas kernel", plural=False, dtypes=KERNEL_DTYPES,
                               dtype_names="float16, bfloat16 and float32")


def _mosaic_unsupported(query, scale, *, features: dict) -> str | None:
    """Why the Mosaic GPU (Hopper) kernels cannot take this call yet (None: they can)."""
    reason = _shared_unsupported(query, scale, who="the Mosaic GPU kernels", plural=True,
                                 dtypes=MOSAIC_DTYPES, dtype_names="float16 and bfloat16")
    if reason is not None:
        return reason
    used = [name for name, value in features.items() if value is not None]
    if used:
        return f"the Mosaic GPU kernels do not support {', '.join(used)} yet (use implementation='triton')"
    if _on_gpu() and not _is_hopper():
        return "the Mosaic GPU kernels need a Hopper GPU (compute capability 9.x)"
    return None


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _is_hopper() -> bool:
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    query_segment_ids: ArrayLike | None = None,
    key_value_segment_ids: ArrayLike | None = None,
    logits_soft_cap: float | None = None,
    implementation: Implementation | None = None,
    return_residual: bool = False,
    config: FlashConfig | None = None,
):
    r"""Scaled dot-product attention, ``softmax(Q K^T * scale + bias) V``, fused (FlashAttention-2).

    Arguments, shapes, defaults and semantics follow `jax.nn.dot_product_attention` (jax 0.11.2):
    ``query`` is ``[B, T, N, H]`` (or ``[T, N, H]``), ``key``/``value`` are ``[B, S, K, H]`` with
    ``N % K == 0`` (K == N: multi-head, 1 < K < N: grouped-query, K == 1: multi-query attention).

    Args:
      query, key, value: floating arrays of one dtype.
      bias, mask: additive bias / boolean mask (True: attend) broadcastable to ``[B, N, T, S]``; the
        kernel reads them in their broadcast-reduced shape, tile by tile, and returns the bias
        gradient summed over its broadcast dims. The bias is added after the soft cap.
      scale: logit scale; ``1/sqrt(H)`` when None.
      is_causal: query ``i`` sees keys ``j <= i``, aligned at the top left as in jax.nn, also when
        ``T != S``. With T=3, S=5::

                   j: 0 1 2 3 4
            i = 0     x . . . .
            i = 1     x x . . .
            i = 2     x x x . .

      query_seq_lengths, key_value_seq_lengths: ``(B,)`` integer valid lengths; rows past the query
        length return zeros, keys past the key length are masked.
      local_window_size: ``w`` or ``(left, right)``: query ``i`` sees keys ``i-left <= j <= i+right``.
      query_segment_ids, key_value_segment_ids: ``[B, T]`` / ``[B, S]`` integer ids of packed
        sequences (both or neither; not in jax.nn): query ``i`` sees key ``j`` only if their ids are
        equal. Any ids are exact; whole blocks are skipped best when ids are non-decreasing per row.
      logits_soft_cap: ``cap > 0`` or None (not in jax.nn): logits become ``cap * tanh(logits / cap)``
        after the scale and before the bias and every mask (Gemma 2 order).
      implementation: ``"mosaic"`` (the FlashAttention-3 style Pallas Mosaic GPU kernels for Hopper:
        float16/bfloat16, causal or not, any T/S/H <= 256, GQA, sequence lengths; no bias, mask,
        window, segment ids or soft cap yet), ``"triton"`` (the Pallas Triton kernels, every feature),
        ``"xla"`` (the pure-jnp float32 reference, O(T*S) memory) or None: on a Hopper GPU
        ``"mosaic"`` when it supports the call, else ``"triton"`` on any GPU when it does, else
        ``"xla"``. Both Pallas kernels run in interpret mode (slow) when no GPU is present.
      return_residual: also return the natural-log log-sum-exp of the scaled logits, ``[B, T, N]``
        (``[T, N]`` for 3-D input) in the input dtype, not differentiated (as in jax.nn).
      config: block sizes and stages of the kernel: a `FlashConfig` (Triton) or a `MosaicConfig`
        (Mosaic GPU), matching the implementation that runs; a per-shape default when None.

    Returns:
      ``[B, T, N, H]`` in the query dtype, and the log-sum-exp when ``return_residual``.

    Differences from jax.nn, on purpose: a query row that sees no key at all (every logit masked)
    returns zeros and a log-sum-exp of -inf, with zero gradients; jax.nn returns the mean of V there.
    A logit whose bias drives it to about -8.3e37 or below (jax.nn's -0.7 * float32 max, finfo.min,
    -inf) counts as masked.

    Raises:
      ValueError: inputs of the wrong rank, shape or dtype, a bad window or implementation name.
      NotImplementedError: ``implementation="triton"`` or ``"mosaic"`` with an input that kernel
        cannot take yet.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    output_shape = jnp.shape(query)
    q, k, v = _as_4d(query, "query"), _as_4d(key, "key"), _as_4d(value, "value")
    if not (jnp.ndim(query) == jnp.ndim(key) == jnp.ndim(value)) or jnp.ndim(query) < 3:
        raise ValueError("query, key and value must all be [B, T|S, N|K, H] (or all 3-D), got "
                         f"query.shape={jnp.shape(query)} key.shape={jnp.shape(key)} "
                         f"value.shape={jnp.shape(value)}")
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != H:
        raise ValueError("key and value must be [B, S, K, H] with the query's batch size and head dim, "
                         f"got query.shape={q.shape} key.shape={k.shape} value.shape={v.shape}")
    if 0 in q.shape or 0 in k.shape:
        raise ValueError(f"empty dimension: query.shape={q.shape} key.shape={k.shape}")
    check_heads_and_dtypes(query=q, key=k, value=v)
    if config is not None and not isinstance(config, (FlashConfig, MosaicConfig)):
        raise ValueError(f"config must be a pallas_flash.FlashConfig, a pallas_flash.MosaicConfig or None, "
                         f"got {config!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(
            scale, (int, float, np.integer, np.floating, jax.Array, np.ndarray))):
        raise ValueError(f"scale must be a number or None, got {scale!r}")
    if bias is not None:
        bias = _as_4d(bias, "bias")
        _check_broadcastable(bias, (B, N, T, S), "bias")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            # An integer bias has no gradient dtype of its own; the logits are float32 anyway.
            bias = bias.astype(jnp.float32)
    if mask is not None:
        mask = _as_4d(mask, "mask")
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be boolean (True = attend), got mask.dtype={mask.dtype}; "
                             "pass an additive mask as bias")
        _check_broadcastable(mask, (B, N, T, S), "mask")
    q_lengths = validate_lengths(query_seq_lengths, B, "query_seq_lengths")
    kv_lengths = validate_lengths(key_value_seq_lengths, B, "key_value_seq_lengths")
    window = normalize_window(local_window_size)
    segments = _segment_ids(query_segment_ids, key_value_segment_ids, B, T, S)
    soft_cap = _soft_cap(logits_soft_cap)
    scale = 1.0 / math.sqrt(H) if scale is None else scale

    reason = _kernel_unsupported(q, scale)
    mosaic_reason = _mosaic_unsupported(q, scale, features=dict(
        bias=bias, mask=mask, local_window_size=window, segment_ids=segments, logits_soft_cap=soft_cap))
    if implementation == "triton" and reason is not None:
        raise NotImplementedError(reason)
    if implementation == "mosaic" and mosaic_reason is not None:
        raise NotImplementedError(mosaic_reason)
    if implementation is None and _on_gpu():
        if mosaic_reason is None and not isinstance(config, FlashConfig):
            implementation = "mosaic"
        elif reason is None:
            implementation = "triton"
    if config is not None and implementation in ("mosaic", "triton") and not isinstance(
            config, MosaicConfig if implementation == "mosaic" else FlashConfig):
        raise ValueError(f"implementation={implementation!r} takes a "
                         f"{'MosaicConfig' if implementation == 'mosaic' else 'FlashConfig'}, got {config!r}")
    if implementation in ("mosaic", "triton"):
        spec = MaskSpec(q_len=T, kv_len=S, is_causal=bool(is_causal), window=window,
                        has_q_lengths=q_lengths is not None, has_kv_lengths=kv_lengths is not None,
                        has_segment_ids=segments is not None, has_mask=mask is not None,
                        soft_cap=soft_cap)
        tuning = (config if isinstance(config, FlashConfig) else
                  default_config(q_len=T, kv_len=S, head_dim=H, dtype_bytes=q.dtype.itemsize))
        mosaic = None
        if implementation == "mosaic":
            mosaic_cfg = config or default_mosaic_config(head_dim=H, is_causal=bool(is_causal), q_len=T)
            mosaic = MosaicStatics(config=mosaic_cfg, scale=float(scale), is_causal=bool(is_causal), q_len=T,
                                   kv_len=S, head_dim=H, groups=N // K, interpret=not _on_gpu(),
                                   seq_lengths=q_lengths is not None or kv_lengths is not None)
            if (mosaic_cfg.fuse_dq and not splits_backward(H)
                    and dq_split(mosaic_cfg.block_q_dkv, mosaic.head_dim_padded) is None):
                raise ValueError(f"MosaicConfig.fuse_dq at head dim {H} needs block_q_dkv a multiple of 128 "
                                 f"(two 64-row dQ halves), got {mosaic_cfg.block_q_dkv}")
            smem = mosaic.config.smem_bytes(H, q.dtype.itemsize)
            if max(smem.values()) > MOSAIC_SMEM_LIMIT:
                raise ValueError(f"{mosaic.config} needs {smem} bytes of shared memory at head dim {H}, more "
                                 f"than the {MOSAIC_SMEM_LIMIT} a CTA can use")
        statics = FlashStatics(mask=spec, scale=float(scale), head_dim=H, tuning=tuning,
                               interpret=not _on_gpu(), mosaic=mosaic)
        # Broadcast dims stay size 1 all the way into the kernels; int8 because Triton has no
        # boolean loads.
        kernel_mask = None if mask is None else mask.astype(jnp.int8)
        out, lse2 = flash_attention(statics, q, k, v, q_lengths, kv_lengths, segments, bias, kernel_mask)
        lse = jnp.transpose(lse2, (0, 2, 1)) * math.log(2.0)  # base 2 -> natural, [B, T, N]
    else:
        out, lse = reference.attention(q, k, v, bias, mask, scale=scale, is_causal=bool(is_causal),
                                       window=window, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                       soft_cap=soft_cap,
                                       q_segment_ids=None if segments is None else segments[0],
                                       kv_segment_ids=None if segments is None else segments[1])
    out = out.reshape(output_shape)
    if not return_residual:
        return out
    return out, jax.lax.stop_gradient(lse.astype(q.dtype).reshape(output_shape[:-1]))
