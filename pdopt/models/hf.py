"""Hugging Face checkpoints (config.json + safetensors) to and from pdopt models.

`load_hf` reads a checkpoint directory with one `model.safetensors` or several shards listed in
`model.safetensors.index.json`; `save_hf` writes one back that `transformers` loads. Weights move
between the layouts below (HF Linear weights are [out, in]; G = H / K):

    q_proj.weight [H*D, E]   <->  qkv_proj[:, :, :G]  [E, K, G, D]     o_proj.weight [E, H*D] <-> o_proj [H, D, E]
    k_proj.weight [K*D, E]   <->  qkv_proj[:, :, G]   [E, K, D]        down_proj.weight [E, F] <-> down_proj [F, E]
    v_proj.weight [K*D, E]   <->  qkv_proj[:, :, G+1] [E, K, D]        lm_head.weight [V, E] <-> lm_head [E, V]
    gate_proj.weight [F, E]  <->  gate_up_proj[:, 0]  [E, F]           (q/k/v biases likewise into qkv_bias)
    up_proj.weight [F, E]    <->  gate_up_proj[:, 1]  [E, F]
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdopt.models.config import ModelConfig
from pdopt.models.transformer import Transformer

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class _Tensor:
  hf_name: str
  path: tuple[Any, ...]  # attribute path of the nnx.Param in Transformer
  hf_shape: tuple[int, ...]
  to_pdopt: Callable[[jax.Array], jax.Array]
  to_hf: Callable[[jax.Array], jax.Array]
  part: tuple[Any, ...] = ()  # index of this tensor within the parameter (several HF tensors share one)


def _tensors(c: ModelConfig) -> Iterator[_Tensor]:
  e, f, h, k, d, v = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
  ident = lambda x: x  # noqa: E731
  yield _Tensor("model.embed_tokens.weight", ("embed",), (v, e), ident, ident)
  yield _Tensor("model.norm.weight", ("final_norm", "weight"), (e,), ident, ident)
  if not c.tie_word_embeddings:
    yield _Tensor("lm_head.weight", ("lm_head",), (v, e), jnp.transpose, jnp.transpose)
  for i in range(c.num_layers):
    pre = f"model.layers.{i}."
    layer = ("layers", i)
    g = h // k
    every = slice(None)
    for name, slots in (("q", slice(0, g)), ("k", slice(g, g + 1)), ("v", slice(g + 1, g + 2))):
      s = slots.stop - slots.start  # heads of this projection per KV head
      yield _Tensor(f"{pre}self_attn.{name}_proj.weight", layer + ("attn", "qkv_proj"), (k * s * d, e),
                    lambda x, s=s: x.reshape(k, s, d, e).transpose(3, 0, 1, 2),
                    lambda x, s=s: x.transpose(1, 2, 3, 0).reshape(k * s * d, e), part=(every, every, slots))
      if c.qkv_bias:
        yield _Tensor(f"{pre}self_attn.{name}_proj.bias", layer + ("attn", "qkv_bias"), (k * s * d,),
                      lambda x, s=s: x.reshape(k, s, d), lambda x, s=s: x.reshape(k * s * d), part=(every, slots))
    yield _Tensor(f"{pre}self_attn.o_proj.weight", layer + ("attn", "o_proj"), (e, h * d),
                  lambda x: x.reshape(e, h, d).transpose(1, 2, 0), lambda x: x.transpose(2, 0, 1).reshape(e, h * d))
    for index, name in enumerate(("gate", "up")):
      yield _Tensor(f"{pre}mlp.{name}_proj.weight", layer + ("mlp", "gate_up_proj"), (f, e),
                    jnp.transpose, jnp.transpose, part=(every, index))
    yield _Tensor(f"{pre}mlp.down_proj.weight", layer + ("mlp", "down_proj"), (e, f), jnp.transpose, jnp.transpose)
    yield _Tensor(f"{pre}input_layernorm.weight", layer + ("input_norm", "weight"), (e,), ident, ident)
    yield _Tensor(f"{pre}post_attention_layernorm.weight", layer + ("post_attn_norm", "weight"), (e,), ident, ident)


def _variable(model: Transformer, path: tuple[Any, ...]) -> nnx.Variable:
  node: Any = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def _shard_files(directory: str) -> list[str]:
  index = os.path.join(directory, _INDEX)
  if os.path.exists(index):
    with open(index, encoding="utf-8") as fh:
      weight_map = json.load(fh).get("weight_map")
    if not weight_map:
      raise ValueError(f"{index} has no 'weight_map'")
    return sorted({os.path.join(directory, name) for name in weight_map.values()})
  single = os.path.join(directory, _SINGLE)
  if os.path.exists(single):
    return [single]
  found = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors"))
  if not found:
    raise FileNotFoundError(f"no safetensors weights in {directory!r} (expected {_SINGLE} or {_INDEX})")
  return found


def _read_tensors(files: list[str]) -> dict[str, jax.Array]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  out: dict[str, jax.Array] = {}
  for path in files:
    if not os.path.exists(path):
      raise FileNotFoundError(f"safetensors shard {path!r} listed in the index does not exist")
    with safe_open(path, framework="flax") as fh:
      for name in fh.keys():
        out[name] = fh.get_tensor(name)
  return out


def load_hf(directory: str | os.PathLike, dtype: str = "float32") -> Transformer:
  """Loads a Llama, Qwen2 or Mistral checkpoint directory written by `transformers`.

  Args:
    directory: holds config.json and model.safetensors (or shards with model.safetensors.index.json).
    dtype: parameter dtype, "float32", "bfloat16" or "float16".

  Returns:
    The Transformer with the checkpoint's weights.

  Raises:
    ValueError: unsupported architecture, a missing tensor, or a tensor of the wrong shape (named).
    FileNotFoundError: no config.json or no weights.
  """
  directory = os.fspath(directory)
  config_path = os.path.join(directory, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"no config.json in {directory!r}")
  config = ModelConfig.from_hf(config_path, dtype=dtype)
  tensors = _read_tensors(_shard_files(directory))
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  target = jnp.dtype(dtype)
  merged: dict[tuple[Any, ...], np.ndarray] = {}  # host buffers of parameters made of several HF tensors
  for spec in _tensors(config):
    if spec.hf_name not in tensors:
      raise ValueError(f"checkpoint {directory!r} is missing tensor {spec.hf_name!r}")
    value = tensors[spec.hf_name]
    if tuple(value.shape) != spec.hf_shape:
      raise ValueError(f"tensor {spec.hf_name!r} has shape {tuple(value.shape)}, expected {spec.hf_shape} "
                       f"from config.json")
    value = spec.to_pdopt(jnp.asarray(value)).astype(target)
    if not spec.part:
      _variable(model, spec.path).set_value(value)
      continue
    if spec.path not in merged:
      merged[spec.path] = np.empty(_variable(model, spec.path).get_value().shape, target)
    merged[spec.path][spec.part] = np.asarray(value)
  for path, value in merged.items():
    _variable(model, path).set_value(jnp.asarray(value))
  _materialize_buffers(model, config)
  return model


def _materialize_buffers(model: Transformer, config: ModelConfig) -> None:
  """Fills the non-parameter state that `nnx.eval_shape` left abstract (RoPE frequencies)."""
  from pdopt.models.layers import rope_inv_freq  # pylint: disable=import-outside-toplevel

  inv_freq = jnp.asarray(rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
  for layer in model.layers:
    layer.attn.inv_freq.set_value(inv_freq)


def save_hf(model: Transformer, directory: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
  """Writes config.json and safetensors weights that `transformers.AutoModelForCausalLM` loads.

  Args:
    model: the model.
    directory: created if needed.
    max_shard_bytes: split the weights into shards of at most this many bytes with an index file; None
      writes a single model.safetensors.
  """
  from safetensors.flax import save_file  # pylint: disable=import-outside-toplevel

  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  config = model.config
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
    json.dump(config.to_hf(), fh, indent=2)
  tensors = {s.hf_name: s.to_hf(_variable(model, s.path)[...][s.part]) for s in _tensors(config)}
  if max_shard_bytes is None:
    save_file(tensors, os.path.join(directory, _SINGLE), metadata={"format": "pt"})
    return
  shards: list[dict[str, jax.Array]] = [{}]
  size = 0
  for name, value in tensors.items():
    nbytes = int(np.prod(value.shape)) * value.dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
    weight_map.update({t: name for t in shard})
  total = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in tensors.values())
  with open(os.path.join(directory, _INDEX), "w", encoding="utf-8") as fh:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
