"""Block sizes of the flash prefill kernel, keyed by (head dim, group size, dtype, card).

The table is data: `ENTRIES` lists (key, config) pairs, `TABLE` is built from it once and rejects a
duplicate key. `lookup` returns the exact entry when there is one and a heuristic default otherwise.
Entries are measured on the card named; see `pallas_kernels/NOTES.md` (## flash_prefill).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp

from pallas_kernels.sizes import next_power_of_2


class Card(enum.Enum):
  """Accelerators the table distinguishes; OTHER covers everything else (and interpret mode)."""

  H100 = "h100"
  H200 = "h200"
  OTHER = "other"

  @classmethod
  def from_device_kind(cls, device_kind: str) -> "Card":
    """Maps `jax.Device.device_kind` (e.g. "NVIDIA H100 80GB HBM3") to a Card."""
    kind = device_kind.lower()
    for card in (cls.H200, cls.H100):
      if card.value in kind:
        return card
    return cls.OTHER


def current_card() -> Card:
  """The card of the default device (OTHER off GPU)."""
  if jax.default_backend() != "gpu":
    return Card.OTHER
  return Card.from_device_kind(jax.devices()[0].device_kind)


@dataclasses.dataclass(frozen=True)
class TuningKey:
  """What the best block sizes depend on.

  Attributes:
    head_dim: D.
    group: G = query heads per KV head.
    dtype: the name of q's dtype, e.g. "bfloat16".
    card: the accelerator.
  """

  head_dim: int
  group: int
  dtype: str
  card: Card


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """One kernel configuration.

  Attributes:
    block_q: query tokens per program; the program's matmul rows are block_q * G.
    block_k: key tokens per inner-loop step.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth of the K/V loads.
    prefetch_pages: load the next key block's page ids one step ahead, in the loop carry.
  """

  block_q: int
  block_k: int
  num_warps: int
  num_stages: int
  prefetch_pages: bool = False


def build_table(entries: Iterable[tuple[TuningKey, BlockConfig]]) -> Mapping[TuningKey, BlockConfig]:
  """Returns a dict of the entries; raises ValueError on a duplicate key."""
  table: dict[TuningKey, BlockConfig] = {}
  for key, config in entries:
    if key in table:
      raise ValueError(f"duplicate tuning key {key}: {table[key]} and {config}")
    table[key] = config
  return table


def _entries() -> list[tuple[TuningKey, BlockConfig]]:
  out = []
  # The H100 rows are copies of the H200 rows, not measured on an H100 (the two cards share the SM; the
  # H200 has more memory bandwidth, which this compute-bound kernel barely uses).
  for card in (Card.H100, Card.H200):
    for dtype in ("bfloat16", "float16"):
      # D=128: 128 matmul rows per program (block_q * G). Measured on H200 2026-11-27 (causal, 16-token
      # pages, NOTES.md): G=1 best at block_k=128, 8 warps, page ids prefetched (+7% at S=16384);
      # G=4 at block_k=64, 4 warps, page ids loaded in-step (prefetching cost 38%). D=64, G=4 (the
      # Llama-3.2-1B shape) measured the same day: 64 rows x 128 keys, 4 warps, 2 stages (193 TFLOP/s at
      # S=8192 against 120 for the 128 x 64 entry it replaced). G=8, and D=64 with G=1 or 8: by analogy.
      out += [
          (TuningKey(128, 1, dtype, card),
           BlockConfig(128, 128, num_warps=8, num_stages=3, prefetch_pages=True)),
          (TuningKey(128, 4, dtype, card), BlockConfig(32, 64, num_warps=4, num_stages=3)),
          (TuningKey(128, 8, dtype, card), BlockConfig(16, 64, num_warps=4, num_stages=3)),
          (TuningKey(64, 1, dtype, card), BlockConfig(128, 64, num_warps=4, num_stages=3)),
          (TuningKey(64, 4, dtype, card), BlockConfig(16, 128, num_warps=4, num_stages=2)),
          (TuningKey(64, 8, dtype, card), BlockConfig(16, 64, num_warps=4, num_stages=3)),
      ]
  return out


ENTRIES: tuple[tuple[TuningKey, BlockConfig], ...] = tuple(_entries())
TABLE: Mapping[TuningKey, BlockConfig] = build_table(ENTRIES)


def default_config(head_dim: int, group: int, dtype: jnp.dtype | str = "bfloat16") -> BlockConfig:
  """Heuristic for keys not in the table: about 128 matmul rows per program, 64 keys per step; for float32
  (no tensor-core path at HIGHEST precision) 16 rows, whose tiles fit in registers: with 128 rows the
  float32 kernel spills and runs 15-30x slower (H200 sweep of 2026-11-27, NOTES.md)."""
  if jnp.dtype(dtype) == jnp.float32:
    block_q = next_power_of_2(-(-16 // group))  # block_q * G >= 16 rows
    return BlockConfig(block_q=block_q, block_k=64, num_warps=4, num_stages=2)
  rows = 128 if head_dim <= 128 else 64
  block_q = max(16, rows // group)
  return BlockConfig(block_q=block_q, block_k=64, num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def lookup(head_dim: int, group: int, dtype: jnp.dtype | str, card: Card) -> BlockConfig:
  """The table's entry for the key, or `default_config` when there is none."""
  key = TuningKey(head_dim, group, jnp.dtype(dtype).name, card)
  return TABLE.get(key) or default_config(head_dim, group, dtype)
