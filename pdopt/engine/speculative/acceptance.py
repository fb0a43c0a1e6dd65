"""The acceptance rule of speculative decoding (Leviathan et al. 2023, Algorithm 1) on the device: which
guesses a sequence keeps and the token it emits after them.

Randomness stays per request and deterministic: token `i` of a request with seed `s` draws from
`fold_in(fold_in(PRNGKey(s), i), stream)` with one stream per purpose (draft sample, acceptance coin,
residual sample); the bonus token is drawn exactly as the non-speculative sampler draws it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdopt.engine import sampler

# PRNG streams folded into a request's per-token key (the plain sampler uses the key unfolded).
DRAFT_STREAM = 1
ACCEPT_STREAM = 2
RESIDUAL_STREAM = 3


def rejection_sample(logits: jax.Array, draft_tokens: jax.Array, num_drafts: jax.Array,
                     draft_probs: jax.Array | None, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                     seeds: jax.Array, token_index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Leviathan et al.'s acceptance rule for a batch of sequences.

  Args:
    logits: [S, K+1, V] float32 target logits; row j predicts the token after guess j-1 (row 0: after the
      last real token).
    draft_tokens: [S, K] int32 guesses; entries past `num_drafts` are padding.
    num_drafts: [S] int32 guesses per sequence (0: a plain step, the token comes from row 0).
    draft_probs: [S, K, V] float32 proposal distributions q, or None for deterministic proposals
      (q = one-hot of the guess, as for n-gram lookup).
    temperature, top_k, top_p: [S] the requests' sampling parameters (temperature 0: greedy).
    seeds: [S] uint32 per-request seeds.
    token_index: [S] int32 index (in the request's output) of the token row 0 predicts.

  Returns:
    (accepted [S] int32 in [0, num_drafts], final [S] int32): the sequence emits `draft_tokens[:accepted]`
    and then `final` (the corrected token after a rejection, else the bonus token).
  """
  s, k1, v = logits.shape
  k = k1 - 1
  rep = lambda x: jnp.repeat(x, k1)  # noqa: E731
  masked = sampler.filter_logits(logits.reshape(s * k1, v), rep(temperature), rep(top_k), rep(top_p))
  p = jax.nn.softmax(masked.reshape(s, k1, v), axis=-1)  # [S, K+1, V]
  q = draft_probs if draft_probs is not None else jax.nn.one_hot(draft_tokens, v, dtype=p.dtype)  # [S, K, V]
  greedy = temperature <= 0  # [S]
  j = jnp.arange(k)
  target_argmax = jnp.argmax(logits[:, :k], axis=-1)  # [S, K]
  px = jnp.take_along_axis(p[:, :k], draft_tokens[..., None], axis=-1)[..., 0]  # [S, K]
  qx = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]  # [S, K]
  index = (token_index[:, None] + j[None, :]).reshape(-1)  # [S*K]
  coin_keys = sampler.request_keys(jnp.repeat(seeds, k), index, ACCEPT_STREAM)
  coins = jax.vmap(jax.random.uniform)(coin_keys).reshape(s, k)  # [S, K] in [0, 1)
  ok = jnp.where(greedy[:, None], draft_tokens == target_argmax, coins * qx < px)  # u < p/q, q(x) > 0
  ok &= j[None, :] < num_drafts[:, None]
  accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [S]
  at = accepted[:, None, None]
  logits_a = jnp.take_along_axis(logits, at, axis=1)[:, 0]  # [S, V]
  bonus = sampler.sample(logits_a, temperature, top_k, top_p, seeds, token_index + accepted)
  p_a = jnp.take_along_axis(p, at, axis=1)[:, 0]  # [S, V]
  q_a = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1), at, axis=1)[:, 0]
  residual = jnp.maximum(p_a - q_a, 0.0)
  residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_a)
  keys = sampler.request_keys(seeds, token_index + accepted, RESIDUAL_STREAM)
  resampled = jax.vmap(jax.random.categorical)(keys, jnp.log(residual)).astype(jnp.int32)
  final = jnp.where((accepted < num_drafts) & ~greedy, resampled, bonus)
  return accepted.astype(jnp.int32), final


def greedy_accept(logits: jax.Array, draft_tokens: jax.Array, num_drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The acceptance rule when no sequence samples: guesses are accepted while they equal the target's
  argmax, and the argmax after the last accepted one is emitted. Same arguments and results as
  `rejection_sample` restricted to temperature 0 (no sort, softmax or random draw)."""
  k = draft_tokens.shape[1]
  target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [S, K+1]
  ok = (draft_tokens == target[:, :k]) & (jnp.arange(k)[None, :] < num_drafts[:, None])
  accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)  # [S]
  return accepted, jnp.take_along_axis(target, accepted[:, None], axis=1)[:, 0]
