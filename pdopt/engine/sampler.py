"""On-device sampling: greedy, and temperature / top-k / top-p with a per-request seed.

Each request's key is `fold_in(PRNGKey(seed), index of the token being generated)`, so a request draws
the same tokens whatever else shares its batches, and the same seed reproduces its output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
  vocab = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
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
  masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
  keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seeds, token_index)
  drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)
