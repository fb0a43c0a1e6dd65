"""Pieces shared by the Mosaic GPU kernels (`flash_prefill.pallas_mgpu`, `paged_decode.pallas_mgpu`): the
facts of sm_90 they are sized by, the shared-memory layout of wgmma operands, and two helpers."""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import llvm

WGMMA_ROWS = 64  # wgmma's M: the rows of one warpgroup's matmul, and of a WGMMA-layout tile
WGMMA_DTYPES = (jnp.bfloat16, jnp.float16)  # the query dtypes both kernels serve
WARP_THREADS = 32
WG_THREADS = 128  # threads of a warpgroup
REGISTERS = 65536  # 32-bit registers per SM (and per CTA)
MAX_REGISTERS = 232  # most registers per thread that `set_max_registers` gives a consumer warpgroup
PRODUCER_REGISTERS = 40  # per thread of a producer (TMA) warpgroup after `set_max_registers`
SHARED_MEMORY_BYTES = 227 * 1024 - 1024  # sm_90's per-CTA maximum, less room for the barriers
NUM_NAMED_BARRIERS = 16  # hardware named barriers (bar.sync / bar.arrive) per CTA
_SWIZZLE_BYTES = 128


def swizzled(dtype) -> tuple:
  """Shared-memory transforms of a wgmma operand or TMA tile whose rows hold `dtype` values: tiles of 8 rows
  of 128 bytes, 128-byte swizzle."""
  return (plgpu.TilingTransform((8, _SWIZZLE_BYTES // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(_SWIZZLE_BYTES))


def named_barrier(op: str, barrier_id, num_threads) -> None:
  """`bar.sync` (wait until `num_threads` threads have arrived, counting the caller's) or `bar.arrive`
  (count the caller's threads, do not wait) on hardware barrier `barrier_id`; both static ints or traced
  scalars."""
  operands, names = [], []  # traced values become register operands $0, $1
  for x in (barrier_id, num_threads):
    names.append(str(x) if isinstance(x, int) else f"${len(operands)}")
    if not isinstance(x, int):
      operands.append(x)

  def asm(_, *regs):
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [r.registers.item() for r in regs],
                    f"bar.{op} {names[0]}, {names[1]};", ",".join("r" * len(regs)), has_side_effects=True)

  plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,) * len(operands))(asm)(
      *(jnp.asarray(x, jnp.int32) for x in operands))


def zero_keys_past_end(v_block, first_key, kv_len) -> None:
  """Zeroes the rows of a V block in shared memory (`[block_kv, D]`, rows are keys first_key, first_key + 1,
  ...) at or past kv_len, when the block reaches that far. Those slots (page tails, pages past the end) may
  hold NaN: their P is 0, but 0 * NaN is not."""
  block_kv = v_block.shape[0]

  @pl.when(first_key + block_kv > kv_len)
  def _():
    for c in range(block_kv // WGMMA_ROWS):
      chunk = v_block.at[pl.ds(c * WGMMA_ROWS, WGMMA_ROWS)]
      v = plgpu.load(chunk, (), layout=plgpu.Layout.WGMMA)
      key = plgpu.broadcasted_iota(jnp.int32, v.shape, 0, layout=plgpu.Layout.WGMMA)
      chunk[...] = jnp.where(key + first_key + c * WGMMA_ROWS < kv_len, v, jnp.zeros_like(v))
    plgpu.commit_smem()
