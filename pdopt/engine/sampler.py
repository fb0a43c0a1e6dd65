"""On-device sampling: greedy, and temperature / top-k / top-p with a per-request seed.

Each request's key is `fold_in(PRNGKey(seed), index of the token being generated)`, so a request draws
the same tokens whatever else shares its batches, and the same seed reproduces its output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Temperature-scaled logits with everything outside the top-k / top-p set at -inf.

  `softmax` of the result is the distribution `sample` draws from when temperature > 0 (speculative
  decoding uses it as the target's p and the draft's q, so that both are filtered the same way).

  Args:
    logits: [S, V] float32.
    temperature: [S] float32; rows with 0 are only scaled by 1 (greedy rows take the argmax instead).
    top_k: [S] int32; 0 keeps the whole vocabulary.
    top_p: [S] float32 in (0, 1].

  Returns:
    [S, V] float32.
  """
  vocab = logits.shape[-1]
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  ordered = -jnp.sort(-scaled, axis=-1)  # [S, V] descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [S, 1]
  in_top_k = jnp.arange(vocab)[None, :] < k[:, None]
  probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each sorted token
  keep = in_top_k & (before < top_p[:, None])
  nucleus_min = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
  threshold = jnp.maximum(kth, nucleus_min)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def request_keys(seeds: jax.Array, token_index: jax.Array, stream: int | None = None) -> jax.Array:
  """One PRNG key per row: `fold_in(PRNGKey(seed), token_index)`, folded once more with `stream` if given
  (speculative decoding draws its extra randomness from separate streams of the same token index)."""
  def key(s, i):
    k = jax.random.fold_in(jax.random.PRNGKey(s), i)
    return k if stream is None else jax.random.fold_in(k, stream)
  return jax.vmap(key)(seeds, token_index)


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, seeds: jax.Array,
           token_index: jax.Array) -> jax.Array:
  """Picks one token per row.

  Args:
    logits: [S, V] float32.
    temperature: [S] float32; 0 means greedy (argmax).
    top_k: [S] int32; 0 keeps the whole vocabulary.
    top_p: [S] float32 in (0, 1].
    seeds: [S] uint32 per-request seeds.
    token_index: [S] int32 index of the token being generated (0 for the first).

  Returns:
    [S] int32 token ids.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  masked = filter_logits(logits, temperature, top_k, top_p)
  keys = request_keys(seeds, token_index)
  drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)
