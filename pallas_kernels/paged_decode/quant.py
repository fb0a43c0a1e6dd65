"""Quantization of K/V values for the paged cache: int8 and float8 (e4m3) with float32 scales.

The KV cache calls `quantize_kv` when it writes new tokens and stores the values in its pages and the
scales beside them; `paged_decode` (and `reference.dequantize_pages`) dequantize as
`values.astype(f32) * scales`. Two granularities:

- "token": one scale per (token, KV head), i.e. `x.shape[:-1]`; for pages `[K, P, page_size, D]` that
  is `[K, P, page_size]`. Computed from each row's absolute maximum, so it needs no calibration.
- "head": one scale per KV head, `[K]`. A cache that writes tokens incrementally must pass a fixed
  (calibrated) `scales` so that earlier tokens stay valid; without it the scale is computed from `x`.

Symmetric quantization: int8 uses [-127, 127] (so that -x is representable), fp8 uses e4m3's
[-448, 448].
"""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

QuantKind = Literal["int8", "fp8"]
Granularity = Literal["token", "head"]

_QMAX = {"int8": 127.0, "fp8": 448.0}
_DTYPE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def _check(kind: str, granularity: str) -> None:
  if kind not in get_args(QuantKind):
    raise ValueError(f"unknown KV quantization kind {kind!r}; valid: {', '.join(get_args(QuantKind))}")
  if granularity not in get_args(Granularity):
    raise ValueError(f"unknown scale granularity {granularity!r}; valid: {', '.join(get_args(Granularity))}")


def storage_dtype(kind: QuantKind) -> jnp.dtype:
  """Returns the dtype of quantized pages for `kind` (int8 or float8_e4m3fn)."""
  _check(kind, "token")
  return jnp.dtype(_DTYPE[kind])


def quantize_kv(
    x: jax.Array,  # [..., D], one axis of which is the KV head axis
    kind: QuantKind,
    granularity: Granularity = "token",
    *,
    head_axis: int = -2,
    scales: jax.Array | None = None,  # [K] float32, only with granularity="head"
) -> tuple[jax.Array, jax.Array]:
  """Quantizes K or V values symmetrically.

  Args:
    x: values to store, e.g. new tokens `[T, K, D]` (head_axis=-2) or whole pages `[K, P, page_size, D]`
      (head_axis=0); any float dtype.
    kind: "int8" or "fp8" (float8 e4m3fn).
    granularity: "token" for a scale per (token, head), "head" for a scale per KV head.
    head_axis: the KV head axis of `x`; used by granularity="head" only.
    scales: fixed per-head scales `[K]` for granularity="head" (a calibrated cache); computed from `x`
      when None.

  Returns:
    (values, scales): `values` of x's shape in int8 or float8_e4m3fn; `scales` float32 of shape
    `x.shape[:-1]` ("token") or `[K]` ("head"), such that `values.astype(f32) * scales` approximates x.
  """
  _check(kind, granularity)
  qmax = _QMAX[kind]
  xf = x.astype(jnp.float32)
  if granularity == "token":
    if scales is not None:
      raise ValueError("fixed scales are only supported with granularity='head'")
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scales = jnp.where(amax > 0, amax / qmax, 1.0)
    bcast = scales[..., None]
  else:
    axis = head_axis % x.ndim
    if axis == x.ndim - 1:
      raise ValueError("head_axis must not be the head-dim (last) axis")
    if scales is None:
      amax = jnp.max(jnp.abs(xf), axis=tuple(a for a in range(x.ndim) if a != axis))
      scales = jnp.where(amax > 0, amax / qmax, 1.0)
    scales = scales.astype(jnp.float32)
    bcast = scales.reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  y = jnp.clip(xf / bcast, -qmax, qmax)
  if kind == "int8":
    values = jnp.round(y).astype(jnp.int8)
  else:
    values = y.astype(jnp.float8_e4m3fn)
  return values, scales


def dequantize_kv(values: jax.Array, scales: jax.Array, *, head_axis: int = -2) -> jax.Array:
  """Inverse of `quantize_kv`: float32 `values * scales` (per-token scales `values.shape[:-1]`, or
  per-head `[K]` along `head_axis`)."""
  out = values.astype(jnp.float32)
  scales = scales.astype(jnp.float32)
  if scales.shape == values.shape[:-1]:
    return out * scales[..., None]
  axis = head_axis % values.ndim
  return out * scales.reshape([-1 if a == axis else 1 for a in range(values.ndim)])
