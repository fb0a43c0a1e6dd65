"""Prompt token ids materialized from lengths: random ids from a seed, optionally sharing common prefixes.

The traces hold lengths, not text, so prompts are random ids in [low, vocab_size); `low` keeps special ids
(padding, BOS, EOS) out of prompts. With `shared_prefix_fraction > 0`, that fraction of requests (chosen from
the seed) begins with one of `num_shared_prefixes` fixed prefixes of `shared_prefix_len` tokens, which gives
a prefix cache something to hit. Lengths never change: the prefix overwrites the first tokens (a prompt
shorter than the prefix is the prefix cut to its length).

The prompts come as `TokenIds`: tuples that carry the bound their ids were drawn below, so that the engine
checks a prompt against its vocabulary once per prompt, not once per token each time it is submitted (a
search submits the same prompts to every simulation).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, TypeVar

import numpy as np

T = TypeVar("T")

# Independent streams of one seed, so that e.g. adding shared prefixes leaves the other ids unchanged.
_TOKEN_STREAM = 0
_PREFIX_STREAM = 1


_UNSEEN, _SEEN_ONCE = object(), object()  # `TokenIds.derived`'s marks.


class TokenIds(tuple):
  """Token ids known to be Python ints in [0, `bound`) (checked when built), as `materialize_prompts` makes
  them; the engine's prompt check then compares `bound` with its vocabulary instead of reading every id.

  Raises:
    ValueError: an id that is not an int (bools and NumPy integers included) or lies outside [0, bound).
  """

  bound: int

  def __new__(cls, ids: Iterable[int], bound: int) -> TokenIds:
    ids = tuple(ids)
    bad = next((t for t in ids if type(t) is not int or not 0 <= t < bound), None)  # pylint: disable=unidiomatic-typecheck
    if bad is not None:
      raise ValueError(f"token id {bad!r} is not an int in [0, {bound})")
    return _trusted(ids, bound)

  def __setattr__(self, name: str, value) -> None:
    raise AttributeError(f"TokenIds are immutable: cannot set {name!r}")

  def derived(self, key: Hashable, compute: Callable[[TokenIds], T]) -> T:
    """`compute(self)`, kept with these ids (which never change) from the second call with `key` on: ids used
    once (a prompt of a replay) keep nothing, and ids used again and again (a prompt in every simulation of a
    search) are computed twice in all. The engine keys a prompt's pages for its prefix cache so. Not pickled."""
    memo: dict[Hashable, Any] = self._derived
    value = memo.get(key, _UNSEEN)
    if value is _UNSEEN:
      memo[key] = _SEEN_ONCE
      return compute(self)
    if value is _SEEN_ONCE:
      value = memo[key] = compute(self)
    return value

  def __reduce__(self):
    return _trusted, (tuple(self), self.bound)


def _trusted(ids: Iterable[int], bound: int) -> TokenIds:
  """`TokenIds` of ids already known to be ints in [0, bound)."""
  token_ids = tuple.__new__(TokenIds, ids)
  object.__setattr__(token_ids, "bound", bound)
  object.__setattr__(token_ids, "_derived", {})
  return token_ids


def materialize_prompts(prompt_lens: np.ndarray, vocab_size: int, seed: int = 0, low: int = 0,
                        shared_prefix_fraction: float = 0.0, num_shared_prefixes: int = 1,
                        shared_prefix_len: int = 0) -> list[TokenIds]:
  """Makes one prompt per length, deterministically from the seed.

  Args:
    prompt_lens: [N] prompt lengths in tokens (>= 0).
    vocab_size: ids are drawn from [low, vocab_size).
    seed: the same seed and arguments give the same prompts.
    low: smallest id drawn (>= 0, < vocab_size).
    shared_prefix_fraction: fraction in [0, 1] of requests that start with a shared prefix; round(f * N) of
      them, chosen from the seed.
    num_shared_prefixes: how many distinct prefixes (>= 1); each chosen request uses one, uniformly.
    shared_prefix_len: tokens per shared prefix (>= 0; 0 disables sharing).

  Returns:
    N `TokenIds` (tuples of Python ints below `vocab_size`; all share the int objects, which keeps long traces
    small in memory).

  Raises:
    ValueError: a bad id range, fraction, count or length, named.
  """
  if not 0 <= low < vocab_size:
    raise ValueError(f"need 0 <= low < vocab_size, got low={low!r}, vocab_size={vocab_size!r}")
  if not 0.0 <= shared_prefix_fraction <= 1.0:
    raise ValueError(f"shared_prefix_fraction must be in [0, 1], got {shared_prefix_fraction!r}")
  if num_shared_prefixes < 1:
    raise ValueError(f"num_shared_prefixes must be >= 1, got {num_shared_prefixes!r}")
  if shared_prefix_len < 0:
    raise ValueError(f"shared_prefix_len must be >= 0, got {shared_prefix_len!r}")
  lens = np.asarray(prompt_lens, np.int64)
  if (lens < 0).any():
    raise ValueError(f"prompt lengths must be >= 0, got {int(lens.min())}")
  offsets = np.concatenate([[0], np.cumsum(lens)])
  ids = np.random.default_rng([seed, _TOKEN_STREAM]).integers(low, vocab_size, size=int(offsets[-1]))

  num_shared = round(shared_prefix_fraction * len(lens))
  if num_shared and shared_prefix_len:
    rng = np.random.default_rng([seed, _PREFIX_STREAM])
    prefixes = rng.integers(low, vocab_size, size=(num_shared_prefixes, shared_prefix_len))
    chosen = np.sort(rng.choice(len(lens), size=num_shared, replace=False))
    which = rng.integers(0, num_shared_prefixes, size=num_shared)
    for i, k in zip(chosen, which):
      n = min(int(lens[i]), shared_prefix_len)
      ids[offsets[i]:offsets[i] + n] = prefixes[k, :n]

  # Python ints shared through one table: a tuple then costs a pointer per token, not an int object.
  table = np.empty((vocab_size,), dtype=object)
  table[:] = range(vocab_size)
  objs = table[ids]
  return [_trusted(objs[offsets[i]:offsets[i + 1]], vocab_size) for i in range(len(lens))]
