"""A step's device inputs: `StepBatch`, its shape buckets, and its trip to the device in one buffer.

Shapes are padded to a small fixed set of buckets (tokens T, sequences S, pages per sequence P) so the
step compiles once per bucket, never per request. A `StepBatch` is a frozen dataclass registered as a
pytree: the core arrays every step has, and typed optional groups that only some programs read (a chained
decode step's link to the previous program's tokens, speculative verification's guesses, the draft
model's step counts). Which groups are present, and `decode_only`, are part of the tree structure, so a
program compiles once per combination and never branches on a dictionary's keys.

On the way to the device, every host (numpy) leaf is packed into one int32 buffer (one host-to-device
copy per step instead of one per array, which cost the host about a millisecond per step); leaves that
are already device arrays (another program's outputs) pass through as they are. `StepLayout` (static)
says how to take the buffer apart again inside the jitted program.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdopt.models.layers import AttentionMetadata


def geometric_buckets(smallest: int, largest: int, factor: int = 4) -> tuple[int, ...]:
  """smallest, smallest*factor, ... capped by and always including `largest`."""
  out, b = [], max(1, min(smallest, largest))
  while b < largest:
    out.append(b)
    b *= factor
  out.append(largest)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Allowed padded sizes; a batch takes the smallest bucket that holds it in each dimension."""
  tokens: tuple[int, ...]
  seqs: tuple[int, ...]
  pages: tuple[int, ...]

  @staticmethod
  def _pick(sizes: tuple[int, ...], n: int, what: str) -> int:
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
      raise ValueError(f"{what}={n} exceeds the largest bucket {sizes[-1]}")
    return sizes[i]

  def pick(self, num_tokens: int, num_seqs: int, max_pages: int) -> tuple[int, int, int]:
    return (self._pick(self.tokens, num_tokens, "tokens"), self._pick(self.seqs, num_seqs, "sequences"),
            self._pick(self.pages, max_pages, "pages per sequence"))

  def all_shapes(self) -> list[tuple[int, int, int]]:
    """Every (T, S, P) combination `pick` can return: a sequence bucket is reachable with token bucket T
    when its smallest sequence count (one more than the bucket below it) fits in T tokens."""
    lower = dict(zip(self.seqs, (0,) + self.seqs[:-1]))
    return [(t, s, p) for t in self.tokens for s in self.seqs for p in self.pages if lower[s] + 1 <= t]

  def decode_shapes(self, max_seqs: int) -> list[tuple[int, int, int]]:
    """Every (T, S, P) `pick` returns for a batch of n one-token sequences, n = 1 ... max_seqs."""
    pairs = {(self._pick(self.tokens, n, "tokens"), self._pick(self.seqs, n, "sequences"))
             for n in range(1, min(max_seqs, self.tokens[-1], self.seqs[-1]) + 1)}
    return [(t, s, p) for t, s in sorted(pairs) for p in self.pages]


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
  """One sequence's part of a step: tokens [start, start + len(token_ids)) of its sequence."""
  token_ids: Sequence[int]
  start: int
  page_table: Sequence[int]
  temperature: float
  top_k: int
  top_p: float
  seed: int
  token_index: int  # Index (in the request's output) of the token this chunk would sample.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingInputs:
  """Per sequence slot, how its next token is drawn (`pdopt.engine.sampler`); padding slots are greedy."""
  temperature: np.ndarray | jax.Array  # [S] float32, 0 is greedy
  top_k: np.ndarray | jax.Array  # [S] int32, 0 keeps the whole vocabulary
  top_p: np.ndarray | jax.Array  # [S] float32 in (0, 1]
  seeds: np.ndarray | jax.Array  # [S] uint32
  token_index: np.ndarray | jax.Array  # [S] int32, index in the request's output of the token drawn


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChainInputs:
  """A decode step dispatched before the previous program's tokens were read (`async_executor`): row r's
  input token is `prev_tokens[prev_rows[r]]` when `prev_rows[r] >= 0`."""
  prev_rows: np.ndarray | jax.Array  # [T] int32
  prev_tokens: jax.Array  # [S'] int32, the previous program's last tokens, on the device


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyInputs:
  """Speculative verification (`speculative.programs.verify_impl`): sequence s ends with `num_drafts[s]`
  guesses. Host guesses (n-gram lookup) come in `draft_tokens`; a draft model's stay on the device
  (`guess_tokens`, and `guess_probs` when some request samples) and sequence s's are row `draft_rows[s]`."""
  num_drafts: np.ndarray | jax.Array  # [S] int32
  draft_tokens: np.ndarray | jax.Array | None = None  # [S, k] int32
  draft_rows: np.ndarray | jax.Array | None = None  # [S] int32, -1: no guesses
  guess_tokens: jax.Array | None = None  # [S', k] int32
  guess_probs: jax.Array | None = None  # [S', k, V] float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftInputs:
  """The draft model's pass (`speculative.programs.draft_impl`): guesses sequence s keeps (0: catch up only)."""
  draft_steps: np.ndarray | jax.Array  # [S] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
  """One step's flat, padded inputs (numpy on the host, jax arrays inside a program).

  Padding tokens get slot -1 (nothing written) and belong to no sequence; padding sequences have no
  queries and kv_len 0.

  Attributes:
    token_ids, positions: [T] int32 input tokens and their positions in their sequences.
    slot_mapping: [T] int32 cache slot (page * page_size + offset) each token's K/V is written to; -1 none.
    cu_q_lens: [S + 1] int32 cumulative query lengths.
    kv_lens: [S] int32 keys each sequence attends to (cached plus this step's).
    page_table: [S, P] int32 pages of each sequence.
    num_seqs: [1] int32 real sequences.
    logits_indices: [S] int32 row of each sequence's last token (whose logits sample its next token).
    sampling: how each sequence samples.
    chain, verify, draft: the optional groups (module docstring).
    decode_only: static: every real sequence decodes one token (sequence s's token is row s), so attention
      runs its decode kernel alone; a separate compilation.
  """
  token_ids: np.ndarray | jax.Array
  positions: np.ndarray | jax.Array
  slot_mapping: np.ndarray | jax.Array
  cu_q_lens: np.ndarray | jax.Array
  kv_lens: np.ndarray | jax.Array
  page_table: np.ndarray | jax.Array
  num_seqs: np.ndarray | jax.Array
  logits_indices: np.ndarray | jax.Array
  sampling: SamplingInputs
  chain: ChainInputs | None = None
  verify: VerifyInputs | None = None
  draft: DraftInputs | None = None
  decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, int, int]:
    """(T, S, P), the bucket."""
    return (self.token_ids.shape[0], *self.page_table.shape)

  @property
  def samples(self) -> bool:
    """Some sequence samples (temperature > 0): the step needs the sampled programs (host batches only)."""
    return bool(np.any(self.sampling.temperature > 0))

  def metadata(self) -> AttentionMetadata:
    """What the model's attention layers read."""
    return AttentionMetadata(positions=self.positions, slot_mapping=self.slot_mapping, cu_q_lens=self.cu_q_lens,
                             kv_lens=self.kv_lens, page_table=self.page_table, num_seqs=self.num_seqs,
                             decode_only=self.decode_only)

  def replace(self, **changes) -> StepBatch:
    return dataclasses.replace(self, **changes)

  def to_transfer(self) -> tuple[np.ndarray, tuple[jax.Array, ...], StepLayout]:
    """The host leaves packed into one int32 buffer (as bits), the device leaves as they are, and the layout
    that `from_transfer` takes them apart with.

    Raises:
      TypeError: a host leaf whose dtype is not 4 bytes wide.
    """
    leaves, treedef = jax.tree_util.tree_flatten(self)
    parts, device, entries, offset = [], [], [], 0
    for i, leaf in enumerate(leaves):
      if isinstance(leaf, jax.Array):
        entries.append((len(device), None, None, -1))
        device.append(leaf)
        continue
      a = np.ascontiguousarray(leaf)
      if a.dtype.itemsize != 4:
        raise TypeError(f"StepBatch leaf {i} has dtype {a.dtype}; only 4-byte dtypes are packed")
      flat = a.view(np.int32).reshape(-1)
      parts.append(flat)
      entries.append((offset, a.shape, a.dtype.name, flat.size))
      offset += flat.size
    buffer = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return buffer, tuple(device), StepLayout(treedef, tuple(entries))

  @staticmethod
  def from_transfer(buffer: jax.Array, device: Sequence[jax.Array], layout: StepLayout) -> StepBatch:
    """Inverse of `to_transfer`, inside a program (slices and bitcasts, free there)."""
    leaves = []
    for offset, shape, dtype, size in layout.entries:
      if shape is None:
        leaves.append(device[offset])
        continue
      piece = jax.lax.slice(buffer, (offset,), (offset + size,))
      if dtype != "int32":
        piece = jax.lax.bitcast_convert_type(piece, jnp.dtype(dtype))
      leaves.append(piece.reshape(shape))
    return jax.tree_util.tree_unflatten(layout.treedef, leaves)


@dataclasses.dataclass(frozen=True)
class StepLayout:
  """The static half of a transferred `StepBatch` (a jit static argument): its tree structure (groups,
  `decode_only`) and, per leaf, (offset, shape, dtype, size) in the buffer, or (device index, None, None,
  -1) for a leaf that is already a device array."""
  treedef: jax.tree_util.PyTreeDef
  entries: tuple[tuple, ...]


def build(chunks: Sequence[ChunkSpec], page_size: int, shape: tuple[int, int, int],
          decode_only: bool = False) -> StepBatch:
  """The host `StepBatch` of `chunks`, padded to `shape` = (T, S, P)."""
  t_pad, s_pad, p_pad = shape
  token_ids = np.zeros(t_pad, np.int32)
  positions = np.zeros(t_pad, np.int32)
  slots = np.full(t_pad, -1, np.int32)
  cu_q_lens = np.zeros(s_pad + 1, np.int32)
  kv_lens = np.zeros(s_pad, np.int32)
  page_table = np.zeros((s_pad, p_pad), np.int32)
  logits_indices = np.zeros(s_pad, np.int32)
  temperature = np.zeros(s_pad, np.float32)
  top_k = np.zeros(s_pad, np.int32)
  top_p = np.ones(s_pad, np.float32)
  seeds = np.zeros(s_pad, np.uint32)
  token_index = np.zeros(s_pad, np.int32)
  s = len(chunks)
  if s:
    q_lens = np.fromiter((len(c.token_ids) for c in chunks), np.int32, count=s)
    t = int(q_lens.sum())
    seq = np.repeat(np.arange(s), q_lens)  # [t] sequence of each token
    ends = np.cumsum(q_lens)
    starts = np.fromiter((c.start for c in chunks), np.int32, count=s)
    token_ids[:t] = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int32, count=t)
    positions[:t] = starts[seq] + np.arange(t) - (ends - q_lens)[seq]
    # Ragged page tables into the padded [S, P] table in one scatter.
    n_pages = np.fromiter((len(c.page_table) for c in chunks), np.int64, count=s)
    rows = np.repeat(np.arange(s), n_pages)
    cols = np.arange(rows.size) - np.repeat(np.cumsum(n_pages) - n_pages, n_pages)
    page_table[rows, cols] = np.fromiter(itertools.chain.from_iterable(c.page_table for c in chunks), np.int32,
                                         count=rows.size)
    slots[:t] = page_table[seq, positions[:t] // page_size] * page_size + positions[:t] % page_size
    kv_lens[:s] = starts + q_lens
    cu_q_lens[1:s + 1] = ends
    cu_q_lens[s + 1:] = t
    logits_indices[:s] = ends - 1
    temperature[:s] = [c.temperature for c in chunks]
    top_k[:s] = [c.top_k for c in chunks]
    top_p[:s] = [c.top_p for c in chunks]
    seeds[:s] = [c.seed for c in chunks]
    token_index[:s] = [c.token_index for c in chunks]
  return StepBatch(token_ids=token_ids, positions=positions, slot_mapping=slots, cu_q_lens=cu_q_lens,
                   kv_lens=kv_lens, page_table=page_table, num_seqs=np.asarray([s], np.int32),
                   logits_indices=logits_indices,
                   sampling=SamplingInputs(temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                                           token_index=token_index),
                   decode_only=decode_only)
