"""Building blocks of the Llama-family decoder: RMSNorm, RoPE, paged GQA attention, SwiGLU MLP.

Activations are flat ragged batches `[T, E]`: the tokens of all sequences in a step, one after another.
Letters of shapes and einsums: the legend of `pallas_kernels` (`pallas_kernels/__init__.py`). Every parameter
is created by `param` with the logical axis names of its dimensions ("embed", "heads", ...), which
`pdopt.sharding` maps to mesh axes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import api as attention_api
from pdopt.cache.kv_cache import LayerCache, write_layer
from pdopt.models.config import ModelConfig, RopeScaling, RopeType


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
  """Where each token of a ragged batch sits and which KV pages its sequence reads (device arrays).

  Attributes:
    positions: [T] int32 absolute position of each token in its sequence.
    slot_mapping: [T] int32 flat cache slot `page * page_size + offset` that receives each token's K/V;
      negative for padding tokens (nothing is written).
    cu_q_lens: [S + 1] int32 cumulative query lengths.
    kv_lens: [S] int32 KV length of each sequence after this step.
    page_table: [S, Pmax] int32 page ids of each sequence.
    num_seqs: [1] int32 number of real sequences.
    decode_only: static (a Python bool, not a leaf): every real sequence has exactly one token, sequence s
      at row s; the attention then runs its decode kernel alone (see `pallas_kernels.reference`).
  """
  positions: jax.Array
  slot_mapping: jax.Array
  cu_q_lens: jax.Array
  kv_lens: jax.Array
  page_table: jax.Array
  num_seqs: jax.Array
  decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))


def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
  """Einsum with float32 accumulation; float32 products run at HIGHEST precision (no TF32).

  The output is `out_dtype` (default: a's dtype). A 16-bit product whose output keeps its dtype is asked for in
  that dtype: the matrix units (and XLA's CPU dots) accumulate it in float32 anyway, and asking for a float32
  result that is then rounded made XLA's GPU matmuls up to 40% slower at prefill shapes (H200, NOTES.md).
  """
  out_dtype = jnp.dtype(out_dtype or a.dtype)
  dtype = jnp.result_type(a, b)  # what the operands are computed in
  if dtype == jnp.float32:
    out = jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  else:
    out = jnp.einsum(spec, a, b, preferred_element_type=out_dtype if out_dtype == dtype else jnp.float32)
  return out.astype(out_dtype)


def param(value: jax.Array, *axes: str) -> nnx.Param:
  """`value` as an `nnx.Param` whose dimensions carry the logical axis names `axes`, one per dimension.

  The names are Flax's `out_sharding` metadata of the Param; `pdopt.sharding` maps them to mesh axes through
  its one rules table (`LOGICAL_RULES`). The Param is not sharded when it is created (`eager_sharding=False`):
  a model is built on one device, and `pdopt.sharding.shard_model` places it on a mesh.

  Raises:
    ValueError: the number of names is not the number of dimensions.
  """
  if len(axes) != value.ndim:
    raise ValueError(f"{len(axes)} logical axes {axes} for a parameter of shape {value.shape}")
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02) -> jax.Array:
  return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32, weight applied in the activation dtype (as in HF Llama)."""

  def __init__(self, dim: int, eps: float, dtype):
    self.weight = param(jnp.ones((dim,), dtype), "embed")
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """x [..., E] over its root mean square (in float32), times `weight` [E] in x's dtype."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight * xf.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
  """Inverse RoPE frequencies [D / 2] (float32), with linear or Llama 3 scaling applied."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
  inv_freq = inv_freq.astype(np.float32)
  match scaling.rope_type:
    case RopeType.DEFAULT:
      return inv_freq
    case RopeType.LINEAR:
      return (inv_freq / scaling.factor).astype(np.float32)
    case RopeType.LLAMA3:
      old_len = scaling.original_max_position_embeddings
      low_wavelen = old_len / scaling.low_freq_factor
      high_wavelen = old_len / scaling.high_freq_factor
      wavelen = 2 * math.pi / inv_freq
      scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
      smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
      smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
      medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
      return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"unsupported rope type {scaling.rope_type}")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates `x` [T, H or K, D] by its positions [T] (the half-split convention of HF Llama)."""
  freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
  cos = jnp.cos(freqs).astype(x.dtype)[:, None, :]
  sin = jnp.sin(freqs).astype(x.dtype)[:, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def merge_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The layout of `Attention.qkv_proj` and `qkv_bias` from separate projections: q [..., H, D], k and v
  [..., K, D] -> [..., K, G + 2, D] (per KV head its G query heads, then k, then v)."""
  *lead, kv_heads, d = k.shape
  q = q.reshape(*lead, kv_heads, -1, d)
  return jnp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)


def qkv_rope(x: jax.Array, qkv_proj: jax.Array, qkv_bias: jax.Array | None, positions: jax.Array,
             inv_freq: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q [T, H, D] and k [T, K, D] rotated to their positions [T], and v [T, K, D], of normalized tokens x
  [T, E] through the merged projection `qkv_proj` [E, K, G + 2, D] (and bias [K, G + 2, D] or None)."""
  qkv = einsum("TE,EKRD->TKRD", x, qkv_proj)
  if qkv_bias is not None:
    qkv = qkv + qkv_bias
  group = qkv.shape[2] - 2
  q = qkv[:, :, :group].reshape(qkv.shape[0], -1, qkv.shape[-1])
  return apply_rope(q, positions, inv_freq), apply_rope(qkv[:, :, group], positions, inv_freq), qkv[:, :, group + 1]


def norm_qkv_rope_write(x: jax.Array, norm_weight: jax.Array, qkv_proj: jax.Array, qkv_bias: jax.Array | None,
                        positions: jax.Array, inv_freq: jax.Array, slot_mapping: jax.Array, cache: LayerCache, *,
                        eps: float) -> tuple[jax.Array, LayerCache]:
  """The first half of an attention layer before attention itself: RMSNorm of the residual stream x [T, E]
  (weight [E], eps), q/k/v with RoPE (`qkv_rope`), and k and v written into the cache at `slot_mapping` [T]
  (`write_layer`). Returns (q [T, H, D], the cache). The model's unfused path, rounding to the activation
  dtype after each step as HF Llama does, and serving quantized caches; `pallas_kernels.fused_layer` does the
  same in two GPU kernels (its reference: `pallas_kernels.reference.norm_qkv_rope_write`)."""
  q, k, v = qkv_rope(rms_norm(x, norm_weight, eps), qkv_proj, qkv_bias, positions, inv_freq)
  return q, write_layer(cache, k, v, slot_mapping)


# Most tokens of a decode step that the fused norm + q/k/v kernel serves. At the Llama-3.2-1B shape on an
# H200 it took 6-7% off the batch-1 step's busy time and 2% at batch 64, and added 4% at batch 256, where its
# matmul reads the weights once per 64-row block and XLA's GEMM once (pallas_kernels/NOTES.md, ## engine).
FUSED_MAX_TOKENS = 64


def fused_backend(meta: AttentionMetadata, attention_backend: str, num_tokens: int) -> str:
  """Backend of the fused norm + q/k/v kernel (`pallas_kernels.fused_layer`) for a step of `num_tokens`:
  "auto" for decode-only steps of at most FUSED_MAX_TOKENS tokens unless attention runs its reference,
  "reference" otherwise.

  Decode steps only: there a step is the weights' bytes plus a launch per kernel, and the fusion saves
  launches; a prompt's matmuls are compute-bound and XLA's GEMMs run them faster. Inputs the kernel does not
  serve (quantized caches) fall back to the reference whatever the attention backend. The kernel is a GPU
  kernel: on TPU `dispatch` finds none for the platform and the model takes its unfused path, which XLA fuses
  on its own, while attention still goes to the TPU kernel.
  """
  reference = attention_api.Backend.parse(attention_backend) is attention_api.Backend.REFERENCE
  return "auto" if meta.decode_only and num_tokens <= FUSED_MAX_TOKENS and not reference else "reference"


def _fused_qkv_kernel():  # a bare loader is a GPU kernel's (`attention_api.dispatch`)
  from pallas_kernels.fused_layer import norm_qkv_rope_write as kernel  # pylint: disable=import-outside-toplevel
  return kernel


class Attention(nnx.Module):
  """Grouped-query attention over a paged KV cache.

  The q, k and v projections are one weight `qkv_proj` [E, K, G + 2, D]: for each KV head, its G query heads,
  then its key, then its value (query head h belongs to KV head h // G, as in HF Llama). One matmul then
  reads all three (at the 1B shape's batch-64 decode step, q/k/v 8.7 -> 7.1 us per layer on an H200, see
  pallas_kernels/NOTES.md), and tensor parallelism splits it along K, giving each device whole groups.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    # Drawn as three projections (the random model of a seed does not depend on the layout).
    self.qkv_proj = param(merge_qkv(*(_normal(rngs, (e, n, d), dtype) for n in (h, k, k))),  # [E, K, G + 2, D]
                          "embed", "kv_heads", "qkv", "head_dim")
    self.o_proj = param(_normal(rngs, (h, d, e), dtype), "heads", "head_dim", "embed")  # [H, D, E]
    self.qkv_bias = (param(jnp.zeros((k, h // k + 2, d), dtype), "kv_heads", "qkv", "head_dim")  # [K, G + 2, D]
                     if config.qkv_bias else None)
    self.sm_scale = d ** -0.5
    self.sliding_window = config.sliding_window
    self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(d, config.rope_theta, config.rope_scaling)))

  def _bias(self) -> jax.Array | None:
    return None if self.qkv_bias is None else self.qkv_bias[...]

  def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [T, H, D] and k [T, K, D] rotated to their positions [T], and v [T, K, D], of normalized tokens x
    [T, E]."""
    return qkv_rope(x, self.qkv_proj[...], self._bias(), positions, self.inv_freq[...])

  def __call__(self, x: jax.Array, norm: RMSNorm, meta: AttentionMetadata, cache: LayerCache,
               attention_backend: str = "auto") -> tuple[jax.Array, LayerCache]:
    """Attention of the residual stream x [T, E] after `norm`; returns (the o projection [T, E], the cache)."""
    backend = fused_backend(meta, attention_backend, x.shape[0])
    q, cache = attention_api.dispatch(_fused_qkv_kernel, norm_qkv_rope_write, backend, x, norm.weight[...],
                                      self.qkv_proj[...], self._bias(), meta.positions, self.inv_freq[...],
                                      meta.slot_mapping, cache, eps=norm.eps)
    k_pages, v_pages, *scales = cache
    out = attention_api.ragged_paged_attention(
        q, k_pages, v_pages, meta.kv_lens, meta.page_table, meta.cu_q_lens, meta.num_seqs,
        sm_scale=self.sm_scale, sliding_window=self.sliding_window, k_scales=scales[0] if scales else None,
        v_scales=scales[1] if scales else None, decode_only=meta.decode_only, backend=attention_backend)
    return einsum("THD,HDE->TE", out, self.o_proj[...]), cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up as one weight `gate_up_proj` [E, 2, F] (one matmul)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    e, f = config.hidden_size, config.intermediate_size
    self.gate_up_proj = param(jnp.stack([_normal(rngs, (e, f), dtype) for _ in range(2)], axis=1),  # [E, 2, F]
                              "embed", "gate_up", "mlp")
    self.down_proj = param(_normal(rngs, (f, e), dtype), "mlp", "embed")  # [F, E]

  def __call__(self, x: jax.Array) -> jax.Array:
    gate_up = einsum("TE,ECF->TCF", x, self.gate_up_proj[...])
    return einsum("TF,FE->TE", jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1], self.down_proj[...])
