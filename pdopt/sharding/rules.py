"""The single table mapping logical axis names to mesh axes, applied to the model's parameters and the KV cache.

The model declares the logical axes of each parameter where it creates it (`pdopt.models.layers.param`: the
names are the `out_sharding` metadata of the `nnx.Param`); the KV cache's axes are `CACHE_AXES`. This module
maps both through `LOGICAL_RULES`. Tensor parallelism over `model` (Megatron style): KV heads with their query
heads, MLP columns (gate/up) and rows (down), and the vocabulary are split; activations between blocks stay
replicated, so XLA inserts one all-reduce after the attention output projection and one after the MLP down
projection. The KV cache splits with its KV heads, so each device keeps and reads only its heads' pages.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdopt.models.config import ModelConfig
from pdopt.sharding.mesh import MODEL

# Logical axis -> mesh axis (None: replicated). The only place where this mapping lives.
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": MODEL,
    "embed": None,
    "heads": MODEL,
    "kv_heads": MODEL,
    "head_dim": None,
    "mlp": MODEL,
    "qkv": None,  # the G query heads, key and value of one KV head in `qkv_proj`
    "gate_up": None,
    "pages": None,
    "page_slot": None,
}

CACHE_AXES = ("kv_heads", "pages", "page_slot", "head_dim")


def _spec(axes: tuple[str, ...], what: str) -> PartitionSpec:
  unknown = [a for a in axes if a not in LOGICAL_RULES]
  if unknown:
    raise KeyError(f"{what} has logical axes {unknown} that LOGICAL_RULES does not map; valid: "
                   f"{', '.join(LOGICAL_RULES)}")
  return PartitionSpec(*(LOGICAL_RULES[a] for a in axes))


def _param_spec(path: tuple[Any, ...], variable: nnx.Variable) -> PartitionSpec:
  """The PartitionSpec of the parameter at `path` from the logical axes it was created with."""
  name = f"parameter {'/'.join(map(str, path))}"
  axes = variable.get_metadata().get("out_sharding")
  if axes is None or len(axes) != np.ndim(variable.get_value()):
    raise KeyError(f"{name} of shape {np.shape(variable.get_value())} declares logical axes {axes}; create it "
                   "with pdopt.models.layers.param")
  return _spec(tuple(axes), name)


def validate_tensor_parallel(config: ModelConfig, tp: int) -> None:
  """Raises ValueError naming every model dimension that the tensor-parallel degree does not divide."""
  sizes = {"num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads,
           "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size}
  bad = [f"{name}={size}" for name, size in sizes.items() if size % tp]
  if bad:
    raise ValueError(f"tensor parallelism {tp} over the 'model' mesh axis does not divide {', '.join(bad)}")


def param_shardings(model: nnx.Module, mesh: Mesh) -> Any:
  """NamedShardings for the model's `nnx.Param` state, as a pure dict shaped like its state.

  Raises:
    KeyError: a parameter declares no logical axes, or axes that `LOGICAL_RULES` does not map (named).
  """
  out: dict[Any, Any] = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = NamedSharding(mesh, _param_spec(path, variable))
  return out


def cache_sharding(mesh: Mesh, ndim: int = 4) -> NamedSharding:
  """Sharding of each layer's K or V pages `[K, P, page_size, D]` (ndim 4) or scales `[K, P, page_size]`
  (ndim 3): split by KV head."""
  return NamedSharding(mesh, _spec(CACHE_AXES[:ndim], "the KV cache"))


def put_global(tree: Any, shardings: Any) -> Any:
  """`jax.device_put(tree, shardings)`, also where the shardings span devices of other processes: then
  each process builds its own shards from its copy of the values (which every process must hold alike)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  if not isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x, s: put_global(x, s), tree, shardings)
  sharding_ = shardings

  def put(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding_, lambda index: host[index])
  return jax.tree_util.tree_map(put, tree)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Moves every parameter into its shards on `mesh` (in place) and returns the model.

  Raises:
    ValueError: the `model` axis does not divide heads, KV heads, MLP width or vocabulary (named).
  """
  validate_tensor_parallel(model.config, mesh.shape[MODEL])
  params = nnx.state(model, nnx.Param)
  values = put_global(params.to_pure_dict(), param_shardings(model, mesh))
  params.replace_by_pure_dict(values)
  nnx.update(model, params)
  # Non-parameter state (RoPE frequencies) is small: replicate it on the mesh.
  others = nnx.state(model, nnx.Not(nnx.Param))
  others.replace_by_pure_dict(put_global(others.to_pure_dict(), NamedSharding(mesh, PartitionSpec())))
  nnx.update(model, others)
  return model
