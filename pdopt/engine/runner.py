"""The compiled step: one forward pass over a packed batch plus on-device sampling.

The KV cache lives here and is donated to every step, so XLA updates its pages in place. One jitted
function serves all shape buckets; `num_compilations` counts the shapes compiled so far.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdopt.engine import sampler
from pdopt.models.layers import AttentionMetadata
from pdopt.models.transformer import Transformer, empty_cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _step(graphdef, attention_backend, state, cache, batch):
  model = nnx.merge(graphdef, state)
  meta = AttentionMetadata(positions=batch["positions"], slot_mapping=batch["slot_mapping"],
                           cu_q_lens=batch["cu_q_lens"], kv_lens=batch["kv_lens"], page_table=batch["page_table"],
                           num_seqs=batch["num_seqs"])
  logits, cache = model(batch["token_ids"], meta, cache, logits_indices=batch["logits_indices"],
                        attention_backend=attention_backend)
  tokens = sampler.sample(logits, batch["temperature"], batch["top_k"], batch["top_p"], batch["seeds"],
                          batch["token_index"])
  return tokens, cache


class ModelRunner:
  """Holds the model state and the KV pages on the device and runs compiled steps."""

  def __init__(self, model: Transformer, num_pages: int, page_size: int, attention_backend: str = "auto"):
    self.config = model.config
    self.page_size = page_size
    self.num_pages = num_pages
    self.graphdef, self.state = nnx.split(model)
    self.attention_backend = attention_backend
    self.cache = empty_cache(model.config, num_pages, page_size)

  @property
  def num_compilations(self) -> int:
    """Step programs compiled so far in this process (engines of the same model and shapes share them)."""
    return _step._cache_size()  # pylint: disable=protected-access

  def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Runs one step; returns the sampled token of every (padded) sequence as int32 [S]."""
    tokens, self.cache = _step(self.graphdef, self.attention_backend, self.state, self.cache,
                               {k: jnp.asarray(v) for k, v in batch.items()})
    return np.asarray(tokens)
