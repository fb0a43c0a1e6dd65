"""The rest of a decode step's layer after attention in two kinds of kernel (Pallas, Triton), each a skinny
matmul split over its output columns, so that what follows the matmul runs in its epilogue.

At a small batch a decode step reads every weight once, so a layer's time is its weights' bytes plus a fixed
ramp-up and tail per kernel (pallas_kernels/NOTES.md, ## engine). After attention, XLA runs the o projection,
the residual add, the post-attention RMSNorm, the gate/up matmul, the SiLU product, the down projection and
its residual add (with split-K reductions, 7-9 kernels at the Llama-3.2-1B shape). Here:

- `norm_gate_up_silu`: RMSNorm, the gate/up matmul and silu(gate) * up in one kernel. A program owns a block
  of the F intermediate columns and runs the whole sum over E for both gate and up, so the nonlinear product
  needs no second pass (a split over E would). The norm is folded as in `fused_layer`: `norm(x) @ W =
  diag(1 / rms(x)) ((x * w) @ W)`, with x^2 summed along the way.
- `matmul_add`: `residual + a @ w`, for the o projection and the down projection with their residual adds.

Both read the weights once per row block (one block up to `block_rows` rows). Their references, with the
same signatures, are `pallas_kernels.reference.norm_gate_up_silu` and `pallas_kernels.reference.matmul_add`,
in float32 throughout; the kernels round (x * norm weight) to x's dtype before the matmul, and round their
result once, at the end.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.sizes import is_power_of_2, power_of_2_divisor
from pallas_kernels.triton_util import MATMUL_DTYPES, MIN_DOT, CompilerParams, dot_rows



@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
  """Launch parameters of a skinny matmul.

  Attributes:
    block_rows: most rows of the left operand per program (a power of two >= 16; fewer rows are padded).
    block_cols: output columns per program (a smaller power of two dividing the width is used where this one
      does not; at least 16).
    block_k: summed-over columns per loop step (likewise).
    num_warps, num_stages: Triton launch parameters.
  """
  block_rows: int = 64
  block_cols: int = 64
  block_k: int = 128
  num_warps: int = 4
  num_stages: int = 4


def _check(name: str, x: jax.Array, *weights: jax.Array) -> None:
  if x.ndim != 2 or x.dtype not in MATMUL_DTYPES or any(w.dtype != x.dtype for w in weights):
    raise NotImplementedError(f"{name}: x must be [T, E] float32/bfloat16/float16 like the weights, got {x.shape} "
                              f"{x.dtype} and weights {[str(w.dtype) for w in weights]}")


def _block(size: int, wanted: int, what: str, name: str) -> int:
  block = power_of_2_divisor(size, wanted)
  if block < MIN_DOT:
    raise NotImplementedError(f"{name}: {what} {size} has no power-of-two block of >= {MIN_DOT}")
  return block


# A masked-out row of a store gets an index past the array, never one that another row writes (as in
# `fused_layer`: the Pallas interpreter stores masked lanes as a scatter that drops indices past the end).


def _tile(num_tokens: int, rows: int, cols: int, block_k: int):
  """A program's rows and columns: (its output rows, which are real, the rows to load (clamped), the mask of
  a [rows, block_k] load, its first output column, the column offsets of a k step)."""
  out_row = pl.program_id(0) * rows + lax.broadcasted_iota(jnp.int32, (rows,), 0)
  row_ok = out_row < num_tokens
  return (out_row, row_ok, jnp.minimum(out_row, num_tokens - 1), jnp.broadcast_to(row_ok[:, None], (rows, block_k)),
          pl.program_id(1) * cols, lax.broadcasted_iota(jnp.int32, (1, block_k), 1))


def _gate_up_kernel(x_ref, g_ref, w_ref, o_ref, *, num_tokens: int, rows: int, cols: int, block_k: int,
                    eps: float, precision):
  # x_ref [T, E], g_ref [E], w_ref [E, 2 * F] (gate columns, then up columns), o_ref [T, F]
  hidden, width = x_ref.shape[1], o_ref.shape[1]
  out_row, row_ok, row, x_mask, first, kk = _tile(num_tokens, rows, cols, block_k)
  dims = (((1,), (0,)), ((), ()))

  def body(i, carry):
    gate, up, ss = carry
    start = pl.multiple_of(i * block_k, block_k)
    x = plgpu.load(x_ref.at[row[:, None], start + kk], mask=x_mask, other=0.0).astype(jnp.float32)
    a = (x * g_ref[pl.ds(start, block_k)].astype(jnp.float32)[None, :]).astype(x_ref.dtype)
    gate += lax.dot_general(a, w_ref[pl.ds(start, block_k), pl.ds(first, cols)], dims, precision=precision,
                            preferred_element_type=jnp.float32)
    up += lax.dot_general(a, w_ref[pl.ds(start, block_k), pl.ds(width + first, cols)], dims, precision=precision,
                          preferred_element_type=jnp.float32)
    return gate, up, ss + jnp.sum(x * x, axis=1)

  zeros = jnp.zeros((rows, cols), jnp.float32)
  gate, up, ss = lax.fori_loop(0, hidden // block_k, body, (zeros, zeros, jnp.zeros((rows,), jnp.float32)))
  inv_rms = lax.rsqrt(ss / hidden + eps)[:, None]
  gate, up = gate * inv_rms, up * inv_rms
  out = gate * jax.nn.sigmoid(gate) * up
  col = first + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
  plgpu.store(o_ref.at[out_row[:, None], col], out.astype(o_ref.dtype),
              mask=jnp.broadcast_to(row_ok[:, None], (rows, cols)))


def _matmul_add_kernel(a_ref, w_ref, r_ref, o_ref, *, num_tokens: int, rows: int, cols: int, block_k: int,
                       precision):
  # a_ref [T, K], w_ref [K, N], r_ref [T, N], o_ref [T, N]
  out_row, row_ok, row, a_mask, first, kk = _tile(num_tokens, rows, cols, block_k)

  def body(i, acc):
    start = pl.multiple_of(i * block_k, block_k)
    a = plgpu.load(a_ref.at[row[:, None], start + kk], mask=a_mask, other=0.0)
    return acc + lax.dot_general(a, w_ref[pl.ds(start, block_k), pl.ds(first, cols)], (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, a_ref.shape[1] // block_k, body, jnp.zeros((rows, cols), jnp.float32))
  col = first + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
  mask = jnp.broadcast_to(row_ok[:, None], (rows, cols))
  residual = plgpu.load(r_ref.at[row[:, None], col], mask=mask, other=0.0).astype(jnp.float32)
  plgpu.store(o_ref.at[out_row[:, None], col], (acc + residual).astype(o_ref.dtype), mask=mask)


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def norm_gate_up_silu(x: jax.Array, norm_weight: jax.Array, gate_up_proj: jax.Array, *, eps: float,
                      config: SkinnyConfig | None = None, interpret: bool = False) -> jax.Array:
  """silu(gate) * up of RMSNorm(x), in one kernel; see `reference.norm_gate_up_silu`.

  Args:
    x: [T, E], the residual stream (before the norm); norm_weight [E] and eps: the RMSNorm.
    gate_up_proj: [E, 2, F], gate and up as one weight (`pdopt.models.layers.MLP`).
    config: launch parameters; default `SkinnyConfig()`.
    interpret: run in the Pallas interpreter (CPU tests).

  Returns:
    [T, F] in x's dtype.

  Raises:
    NotImplementedError: dtypes other than float32/bfloat16/float16 (the same for x and the weights), or sizes
      without power-of-two blocks of at least 16 (of E and of F).
  """
  config = config or SkinnyConfig()
  _check("norm_gate_up_silu", x, norm_weight, gate_up_proj)
  hidden, _, width = gate_up_proj.shape
  if gate_up_proj.shape[1] != 2 or hidden != x.shape[1] or norm_weight.shape != (hidden,):
    raise NotImplementedError(f"norm_gate_up_silu: shapes x {x.shape}, norm weight {norm_weight.shape}, "
                              f"gate_up_proj {gate_up_proj.shape}; valid: [T, E], [E], [E, 2, F]")
  if not is_power_of_2(config.block_rows):
    raise NotImplementedError(f"norm_gate_up_silu: block_rows={config.block_rows} must be a power of two")
  cols = _block(width, config.block_cols, "F", "norm_gate_up_silu")
  block_k = _block(hidden, config.block_k, "E", "norm_gate_up_silu")
  num_tokens = x.shape[0]
  rows = dot_rows(num_tokens, config.block_rows)
  return pl.pallas_call(
      functools.partial(_gate_up_kernel, num_tokens=num_tokens, rows=rows, cols=cols, block_k=block_k, eps=eps,
                        precision=_precision(x.dtype)),
      grid=(pl.cdiv(num_tokens, rows), width // cols),
      out_shape=jax.ShapeDtypeStruct((num_tokens, width), x.dtype),
      compiler_params=CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
      interpret=interpret,
      name=f"norm_gate_up_silu_c{cols}",
  )(x, norm_weight, gate_up_proj.reshape(hidden, 2 * width))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def matmul_add(a: jax.Array, w: jax.Array, residual: jax.Array, *, config: SkinnyConfig | None = None,
               interpret: bool = False) -> jax.Array:
  """residual + a @ w, in one kernel; see `reference.matmul_add`.

  Args:
    a: [T, K]; w: [K, N]; residual: [T, N], all of one dtype.
    config: launch parameters; default `SkinnyConfig()`.
    interpret: run in the Pallas interpreter (CPU tests).

  Returns:
    [T, N] in the residual's dtype.

  Raises:
    NotImplementedError: dtypes other than float32/bfloat16/float16 (the same for all three), or sizes without
      power-of-two blocks of at least 16 (of K and of N).
  """
  config = config or SkinnyConfig()
  _check("matmul_add", a, w, residual)
  if w.ndim != 2 or w.shape[0] != a.shape[1] or residual.shape != (a.shape[0], w.shape[1]):
    raise NotImplementedError(f"matmul_add: shapes a {a.shape}, w {w.shape}, residual {residual.shape}; valid: "
                              "[T, K], [K, N], [T, N]")
  if not is_power_of_2(config.block_rows):
    raise NotImplementedError(f"matmul_add: block_rows={config.block_rows} must be a power of two")
  cols = _block(w.shape[1], config.block_cols, "N", "matmul_add")
  block_k = _block(w.shape[0], config.block_k, "K", "matmul_add")
  num_tokens = a.shape[0]
  rows = dot_rows(num_tokens, config.block_rows)
  return pl.pallas_call(
      functools.partial(_matmul_add_kernel, num_tokens=num_tokens, rows=rows, cols=cols, block_k=block_k,
                        precision=_precision(a.dtype)),
      grid=(pl.cdiv(num_tokens, rows), w.shape[1] // cols),
      out_shape=jax.ShapeDtypeStruct(residual.shape, residual.dtype),
      compiler_params=CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
      interpret=interpret,
      name=f"matmul_add_c{cols}",
  )(a, w, residual)
