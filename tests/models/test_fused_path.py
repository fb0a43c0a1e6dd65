"""The model's fused decode path: when it takes the fused norm + q/k/v + RoPE + KV write kernels
(`pallas_kernels.fused_layer`), that it gives what its unfused path gives (kernels interpreted on CPU), and
that on TPU, which has no fused kernel, a decode step takes the unfused path."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pdopt
from pallas_kernels import api
from pallas_kernels.fused_layer import FusedConfig
from pdopt.models import layers


def test_fused_backend_only_for_small_decode_steps():
  meta = layers.AttentionMetadata(*(jnp.zeros(1, jnp.int32) for _ in range(6)))
  decode = dataclasses.replace(meta, decode_only=True)
  assert layers.fused_backend(meta, "auto", 8) == "reference"
  assert layers.fused_backend(decode, "auto", 8) == "auto"
  assert layers.fused_backend(decode, "pallas", layers.FUSED_MAX_TOKENS) == "auto"
  assert layers.fused_backend(decode, "auto", layers.FUSED_MAX_TOKENS + 1) == "reference"
  assert layers.fused_backend(decode, "reference", 8) == "reference"


def test_model_decode_step_through_the_fused_kernel(monkeypatch):
  """The shipped model's decode-only forward with the fused kernel (interpreted) in every layer gives the
  reference's logits and cache: the model hands the kernel the arguments its reference takes."""
  model = pdopt.load_pretrained("tiny-code")
  rng = np.random.default_rng(0)
  page_size, num_pages, seqs = 16, 12, 3
  positions = np.array([5, 40, 17], np.int32)
  table = rng.permutation(num_pages)[:seqs * 4].reshape(seqs, 4).astype(np.int32)
  slots = table[np.arange(seqs), positions // page_size] * page_size + positions % page_size
  meta = layers.AttentionMetadata(
      positions=jnp.asarray(positions), slot_mapping=jnp.asarray(slots, jnp.int32),
      cu_q_lens=jnp.arange(seqs + 1, dtype=jnp.int32), kv_lens=jnp.asarray(positions + 1),
      page_table=jnp.asarray(table), num_seqs=jnp.asarray([seqs], jnp.int32), decode_only=True)
  cache = [tuple(jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in layer)
           for layer in pdopt.models.transformer.empty_cache(model.config, num_pages, page_size)]
  tokens = jnp.asarray([3, 100, 42], jnp.int32)
  want, want_cache = model(tokens, meta, cache, attention_backend="reference")

  calls = []
  original = api.dispatch

  def dispatch(kernel, ref, backend, *args, **kwargs):
    if kernel is layers._fused_qkv_kernel:  # pylint: disable=protected-access
      assert backend == "auto"
      calls.append(1)
      return functools.partial(kernel(), config=FusedConfig(block_k=32), interpret=True)(*args, **kwargs)
    return original(kernel, ref, backend, *args, **kwargs)

  monkeypatch.setattr(api, "dispatch", dispatch)
  got, got_cache = model(tokens, meta, cache, attention_backend="auto")
  assert len(calls) == model.config.num_layers
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  for g, w in zip(jax.tree_util.tree_leaves(got_cache), jax.tree_util.tree_leaves(want_cache)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_decode_step_on_tpu_takes_the_unfused_path(monkeypatch):
  """On TPU (simulated: `api.tpu_interpret_mode`) a decode-only step, which takes the fused kernel on GPU, runs
  the model's unfused norm + q/k/v and the TPU attention kernel, and gives the reference's logits and cache."""
  model = pdopt.load_pretrained("tiny-code")
  rng = np.random.default_rng(1)
  page_size, num_pages, seqs = 16, 12, 3
  positions = np.array([5, 40, 17], np.int32)
  table = rng.permutation(num_pages)[:seqs * 4].reshape(seqs, 4).astype(np.int32)
  slots = table[np.arange(seqs), positions // page_size] * page_size + positions % page_size
  meta = layers.AttentionMetadata(
      positions=jnp.asarray(positions), slot_mapping=jnp.asarray(slots, jnp.int32),
      cu_q_lens=jnp.arange(seqs + 1, dtype=jnp.int32), kv_lens=jnp.asarray(positions + 1),
      page_table=jnp.asarray(table), num_seqs=jnp.asarray([seqs], jnp.int32), decode_only=True)
  cache = [tuple(jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in layer)
           for layer in pdopt.models.transformer.empty_cache(model.config, num_pages, page_size)]
  tokens = jnp.asarray([3, 100, 42], jnp.int32)
  want, want_cache = model(tokens, meta, cache, attention_backend="reference")

  def fused_kernel_loaded():
    raise AssertionError("the GPU fused layer was loaded on TPU")

  monkeypatch.setattr(layers, "_fused_qkv_kernel", fused_kernel_loaded)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens, meta, cache):
    return nnx.merge(graphdef, state)(tokens, meta, cache, attention_backend="pallas")

  with api.tpu_interpret_mode():
    got, got_cache = step(state, tokens, meta, cache)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  for g, w in zip(jax.tree_util.tree_leaves(got_cache), jax.tree_util.tree_leaves(want_cache)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
