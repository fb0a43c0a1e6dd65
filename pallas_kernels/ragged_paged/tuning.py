"""Block sizes of the TPU ragged paged attention kernel, keyed by TPU generation, dtypes and head dim.

The table is data: `ENTRIES` lists (key, config) pairs, `TABLE` is built from it once and rejects a duplicate
key. `lookup` returns the exact entry when there is one and `default_config` otherwise. No entry has been
measured on its chip yet (no TPU was available): each says so in `BlockSizes.source`, and the reasoning
behind the numbers is in `pallas_kernels/NOTES.md` (## ragged_paged (TPU)).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp


class Generation(enum.Enum):
  """TPU generations the table distinguishes; OTHER covers the rest and the interpreter."""

  V5E = "v5e"
  V6E = "v6e"
  V7 = "v7"
  OTHER = "other"

  @classmethod
  def from_device_kind(cls, device_kind: str) -> "Generation":
    """Maps `jax.Device.device_kind` ("TPU v5 lite", "TPU v6e", "TPU7x", ...) to a Generation."""
    kind = device_kind.lower().replace(" ", "")
    if kind in ("tpuv5lite", "tpuv5e"):
      return cls.V5E
    if kind in ("tpuv6lite", "tpuv6e"):
      return cls.V6E
    if kind in ("tpu7", "tpu7x"):
      return cls.V7
    return cls.OTHER


def current_generation() -> Generation:
  """The generation of the default device (OTHER off TPU)."""
  if jax.default_backend() != "tpu":
    return Generation.OTHER
  return Generation.from_device_kind(jax.devices()[0].device_kind)


@dataclasses.dataclass(frozen=True)
class TuningKey:
  """What the best block sizes depend on.

  Attributes:
    generation: the TPU generation.
    q_dtype: the name of q's dtype, e.g. "bfloat16".
    kv_dtype: the name of the pages' dtype, e.g. "bfloat16" or "int8".
    head_dim: D.
  """

  generation: Generation
  q_dtype: str
  kv_dtype: str
  head_dim: int


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """One kernel configuration (sizes in rows of the `[K, T * G, D]` query layout or in tokens).

  Attributes:
    block_rows: query rows per program and KV head (block_q tokens times G, rounded to whole sub-tiles):
      the rows of the matmuls of prompt chunks.
    sub_rows: rows of a sub-tile, the unit of work of a sequence with few rows in a block (decodes,
      speculative verification); a multiple of the sublane tiling of q's dtype.
    block_kv: keys per step of the KV loop (whole pages; at least one page).
    max_sub_tiles: a sequence whose rows in a block span at most this many sub-tiles is computed tile by
      tile, a longer one over the whole block.
    kv_heads_per_block: KV heads per program (a divisor of K); None takes the most that fit `vmem_budget`.
    vmem_budget: bytes of VMEM the kernel may plan for (buffers and scratch, before Mosaic's own).
    source: where the numbers come from: "measured on <chip> ..." or "not measured on <chip>: ...".
  """

  block_rows: int
  sub_rows: int
  block_kv: int
  max_sub_tiles: int = 2
  kv_heads_per_block: int | None = None
  vmem_budget: int = 12 * 1024 * 1024
  source: str = "default"


def build_table(entries: Iterable[tuple[TuningKey, BlockSizes]]) -> Mapping[TuningKey, BlockSizes]:
  """Returns a dict of the entries; raises ValueError on a duplicate key."""
  table: dict[TuningKey, BlockSizes] = {}
  for key, config in entries:
    if key in table:
      raise ValueError(f"duplicate tuning key {key}: {table[key]} and {config}")
    table[key] = config
  return table


# Per generation: (block_rows, block_kv, VMEM planned). A query block re-reads its sequences' K/V, and does R
# FLOPs per byte of bf16 K/V it reads (4 * D FLOPs per row and key against 2 * D * 2 bytes): a prompt chunk is
# compute-bound only with R above the chip's ridge point (bf16 FLOP/s over HBM B/s per TensorCore: v5e 240,
# v6e 561, v7 312), so R is the next power of two above it. Decodes take sub-tiles whatever R is. 512-key steps
# move 2 MB of bf16 K/V per DMA wave at 8 KV heads; v7 (3.7 TB/s per TensorCore) takes 1024 so that a step's
# fixed cost stays small against its copy time. The VMEM plan leaves Mosaic room under each chip's capacity
# (128 MiB on v5e and v6e, 64 MiB on v7).
_PER_GENERATION = {
    Generation.V5E: (256, 512, 24 * 1024 * 1024),
    Generation.V6E: (1024, 512, 48 * 1024 * 1024),
    Generation.V7: (512, 1024, 24 * 1024 * 1024),
}


def _entries() -> list[tuple[TuningKey, BlockSizes]]:
  out = []
  for generation, (rows, block_kv, budget) in _PER_GENERATION.items():
    for kv_dtype in ("bfloat16", "int8", "float8_e4m3fn"):
      for head_dim in (64, 128, 256):
        # Larger heads halve the keys per step to keep the K/V buffers the same size.
        keys = block_kv if head_dim <= 128 else block_kv // 2
        out.append((TuningKey(generation, "bfloat16", kv_dtype, head_dim),
                    BlockSizes(block_rows=rows, sub_rows=16, block_kv=keys, vmem_budget=budget,
                               source=f"not measured on {generation.value}: MXU width and roofline "
                                      "(pallas_kernels/NOTES.md, ## ragged_paged (TPU))")))
  return out


ENTRIES: tuple[tuple[TuningKey, BlockSizes], ...] = tuple(_entries())
TABLE: Mapping[TuningKey, BlockSizes] = build_table(ENTRIES)


def default_config(q_dtype, head_dim: int) -> BlockSizes:
  """Sizes for keys not in the table (float32 queries, other generations, the interpreter): 128 rows, 512
  keys, sub-tiles of one sublane tile of q's dtype (8 rows of float32, 16 of bfloat16)."""
  sub_rows = 8 if jnp.dtype(q_dtype).itemsize == 4 else 16
  return BlockSizes(block_rows=128, sub_rows=sub_rows, block_kv=512 if head_dim <= 128 else 256,
                    source="default (not measured)")


def lookup(generation: Generation, q_dtype, kv_dtype, head_dim: int) -> BlockSizes:
  """The table's entry for the key, or `default_config` when there is none."""
  key = TuningKey(generation, jnp.dtype(q_dtype).name, jnp.dtype(kv_dtype).name, head_dim)
  return TABLE.get(key) or default_config(q_dtype, head_dim)
