"""The decoder-only transformer (Llama, Qwen2, Mistral) as a Flax NNX module over ragged, paged inputs.

One forward call runs a flat batch of tokens from any number of sequences: prompt chunks and decode
tokens alike. Each layer writes the new K/V into the paged cache and attends through
`pallas_kernels.api`. The cache is passed in and returned (functional), so a jitted step can donate it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.sizes import next_power_of_2
from pdopt.cache import kv_cache
from pdopt.cache.kv_cache import LayerCache
from pdopt.models.config import ModelConfig
from pdopt.models.layers import MLP, Attention, AttentionMetadata, RMSNorm, einsum, param



class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.attn = Attention(config, rngs=rngs)
    self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, meta, cache: LayerCache, attention_backend: str):
    h, cache = self.attn(x, self.input_norm, meta, cache, attention_backend=attention_backend)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x))
    return x, cache


class Transformer(nnx.Module):
  """Llama-family causal LM.

  Attributes:
    config: the ModelConfig it was built from.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    v, e = config.vocab_size, config.hidden_size
    self.embed = param((jax.random.normal(rngs.params(), (v, e), jnp.float32) * 0.02).astype(dtype),  # [V, E]
                       "vocab", "embed")
    self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(e, config.rms_norm_eps, dtype)
    if not config.tie_word_embeddings:
      self.lm_head = param((jax.random.normal(rngs.params(), (e, v), jnp.float32) * 0.02).astype(dtype),  # [E, V]
                           "embed", "vocab")

  def __call__(self, token_ids: jax.Array, meta: AttentionMetadata, kv_cache: list[LayerCache],
               logits_indices: jax.Array | None = None, attention_backend: str = "auto",
               ) -> tuple[jax.Array, list[LayerCache]]:
    """Runs one forward pass over a ragged batch.

    Args:
      token_ids: [T] int32 tokens of all sequences, flattened.
      meta: positions, cache slots and page tables of the batch.
      kv_cache: per layer (K pages, V pages), each `[K, P, page_size, D]`.
      logits_indices: [N] rows of the batch whose logits to return (usually each sequence's last token);
        None returns all T rows.
      attention_backend: "auto", "reference" or "pallas" (see `pallas_kernels.api`).

    Returns:
      (logits [N or T, V] float32, the updated cache).
    """
    x = self.embed[...][token_ids]  # [T, E]
    new_cache = []
    for layer, cache in zip(self.layers, kv_cache):
      x, cache = layer(x, meta, cache, attention_backend)
      new_cache.append(cache)
    if logits_indices is not None:
      x = x[logits_indices]
    x = self.final_norm(x)
    head = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
    return einsum("TE,EV->TV", x, head, out_dtype=jnp.float32), new_cache


def init_model(config: ModelConfig, seed: int = 0) -> Transformer:
  """A model with random weights (normal, std 0.02; norms at one) from a fixed seed."""
  return Transformer(config, rngs=nnx.Rngs(params=seed))


def empty_cache(config: ModelConfig, num_pages: int, page_size: int, dtype=None,
                kv_quant: str | None = None) -> list[LayerCache]:
  """Zeroed KV pages for every layer of this model, in the model dtype unless `dtype` is given, or
  quantized ("int8", "fp8") with per-(head, token) scales."""
  return kv_cache.empty_cache(config.num_layers, config.num_kv_heads, config.head_dim, num_pages, page_size,
                              jnp.dtype(dtype or config.dtype), kv_quant)


_LOGITS_PAGE_SIZE = 16


@functools.partial(jax.jit, static_argnums=(0,))
def _full_logits(graphdef, state, token_ids, meta, cache):
  model = nnx.merge(graphdef, state)
  logits, _ = model(token_ids, meta, cache)
  return logits


def logits(model: Transformer, token_ids, kv_quant: str | None = None) -> np.ndarray:
  """Float32 logits at every position of one sequence, computed from scratch.

  The sequence is padded to a power-of-two bucket so repeated calls on growing sequences compile a handful
  of shapes, not one per length.

  Args:
    model: the model.
    token_ids: 1-D sequence of token ids, at least one.
    kv_quant: None, or "int8" / "fp8" to store K/V quantized (what a quantized engine cache computes).

  Returns:
    np.ndarray [len(token_ids), V] float32.
  """
  ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
  n = ids.shape[0]
  if n == 0:
    raise ValueError("pdopt.logits needs at least one token, got an empty sequence")
  vocab = model.config.vocab_size
  if ids.min() < 0 or ids.max() >= vocab:
    bad = int(ids[(ids < 0) | (ids >= vocab)][0])
    raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
  bucket = max(_LOGITS_PAGE_SIZE, next_power_of_2(n))
  num_pages = bucket // _LOGITS_PAGE_SIZE
  padded = np.zeros(bucket, np.int32)
  padded[:n] = ids
  positions = np.arange(bucket, dtype=np.int32)
  meta = AttentionMetadata(
      positions=jnp.asarray(positions),
      slot_mapping=jnp.asarray(np.where(positions < n, positions, -1).astype(np.int32)),
      cu_q_lens=jnp.asarray([0, n], jnp.int32),
      kv_lens=jnp.asarray([n], jnp.int32),
      page_table=jnp.arange(num_pages, dtype=jnp.int32)[None, :],
      num_seqs=jnp.asarray([1], jnp.int32),
  )
  cache = empty_cache(model.config, num_pages, _LOGITS_PAGE_SIZE, kv_quant=kv_quant)
  graphdef, state = nnx.split(model)
  out = _full_logits(graphdef, state, jnp.asarray(padded), meta, cache)
  return np.asarray(out[:n], dtype=np.float32)
