"""Save and restore model parameters with orbax-checkpoint.

A checkpoint directory holds `model_config.json` (the ModelConfig, so the model can be rebuilt without
guessing) and `params/` (an orbax PyTree checkpoint of the `nnx.Param` state).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from pdopt.models.config import Family, ModelConfig, RopeScaling, RopeType
from pdopt.models.hf import _materialize_buffers
from pdopt.models.layers import merge_qkv
from pdopt.models.transformer import Transformer

_CONFIG = "model_config.json"
_PARAMS = "params"


class CheckpointError(ValueError):
  """A checkpoint directory is missing, incomplete or corrupt."""


def _config_to_json(config: ModelConfig) -> dict[str, Any]:
  def encode(value):
    if isinstance(value, enum.Enum):
      return value.value
    if dataclasses.is_dataclass(value):
      return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
      return list(value)
    return value
  return encode(config)


def _config_from_json(data: dict[str, Any]) -> ModelConfig:
  data = dict(data)
  data["family"] = Family(data["family"])
  scaling = dict(data["rope_scaling"])
  scaling["rope_type"] = RopeType(scaling["rope_type"])
  data["rope_scaling"] = RopeScaling(**scaling)
  data["eos_token_id"] = tuple(data["eos_token_id"])
  return ModelConfig(**data)


def save(model: Transformer, directory: str | os.PathLike) -> None:
  """Writes the model's config and parameters to `directory` (created; must not hold a checkpoint yet)."""
  directory = os.path.abspath(os.fspath(directory))
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, _CONFIG), "w", encoding="utf-8") as f:
    json.dump(_config_to_json(model.config), f, indent=2)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, _PARAMS), params)


def load_config(directory: str | os.PathLike) -> ModelConfig:
  """The ModelConfig of a checkpoint saved by `save`, without its parameters.

  Raises:
    CheckpointError: the directory or its config is missing or unreadable (named).
  """
  directory = os.path.abspath(os.fspath(directory))
  config_path = os.path.join(directory, _CONFIG)
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
  try:
    with open(config_path, encoding="utf-8") as f:
      return _config_from_json(json.load(f))
  except FileNotFoundError:
    raise CheckpointError(f"checkpoint {directory!r} has no {_CONFIG}") from None
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"checkpoint config {config_path!r} is corrupt: {e}") from e


def restore(directory: str | os.PathLike, dtype: str | None = None) -> Transformer:
  """Rebuilds a model saved by `save`.

  Args:
    directory: the checkpoint directory.
    dtype: cast parameters to this dtype; None keeps the saved one.

  Returns:
    The Transformer, bit-identical to the saved one when dtype is None.

  Raises:
    CheckpointError: the directory, its config or its parameters are missing or unreadable, or the
      parameters do not match the config (the offending entry is named).
  """
  directory = os.path.abspath(os.fspath(directory))
  config = load_config(directory)
  if dtype is not None:
    config = config.replace(dtype=dtype)
  params_path = os.path.join(directory, _PARAMS)
  if not os.path.isdir(params_path):
    raise CheckpointError(f"checkpoint {directory!r} has no {_PARAMS}/ directory")
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  abstract = nnx.state(model, nnx.Param)
  try:
    loaded = _restore_tree(params_path)
  except Exception as e:  # orbax raises many types for truncated or garbled files.
    raise CheckpointError(f"cannot read parameters in {params_path!r}: {type(e).__name__}: {e}") from e
  expected = abstract.to_pure_dict()
  values = _match(_merge_projections(loaded), expected, directory, "")
  abstract.replace_by_pure_dict(values)
  nnx.update(model, abstract)
  _materialize_buffers(model, config)
  return model


def _restore_tree(path: str) -> Any:
  """The saved tree as it is (whatever its structure, so that `_match` can name a mismatch), every array on
  the default device: newer orbax versions refuse to restore an array without a target sharding."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
  tree = getattr(metadata, "tree", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restore_args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=device), tree)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _merge_projections(tree: Any) -> Any:
  """A tree saved before 2026-11-28, with q/k/v (and their biases) and gate/up as separate parameters, in
  today's layout (`Attention.qkv_proj`, `MLP.gate_up_proj`); any other tree as it is."""
  layers = tree.get("layers") if isinstance(tree, dict) else None
  if not isinstance(layers, dict):
    return tree
  for layer in layers.values():
    attn, mlp = layer.get("attn", {}), layer.get("mlp", {})
    for kind in ("proj", "bias"):  # weights [E, H, D], [E, K, D], [E, K, D]; biases [H, D], [K, D], [K, D]
      if {f"q_{kind}", f"k_{kind}", f"v_{kind}"} <= attn.keys():
        attn[f"qkv_{kind}"] = merge_qkv(*(jax.numpy.asarray(attn.pop(f"{n}_{kind}")) for n in "qkv"))
    if {"gate_proj", "up_proj"} <= mlp.keys():  # [E, F] each
      mlp["gate_up_proj"] = jax.numpy.stack([jax.numpy.asarray(mlp.pop(n)) for n in ("gate_proj", "up_proj")], 1)
  return tree


def _match(loaded: Any, like: Any, directory: str, name: str) -> Any:
  """Checks `loaded` against the expected tree `like` and casts its leaves.

  Orbax stores integer dict keys (layer indices) as strings; they are mapped back.
  """
  if isinstance(like, dict):
    if not isinstance(loaded, dict):
      raise CheckpointError(f"checkpoint {directory!r}: {name or 'params'} is not a mapping")
    out = {}
    for key, sub in like.items():
      if key in loaded:
        value = loaded[key]
      elif str(key) in loaded:
        value = loaded[str(key)]
      else:
        raise CheckpointError(f"checkpoint {directory!r} is missing parameter {name}/{key}")
      out[key] = _match(value, sub, directory, f"{name}/{key}")
    return out
  if tuple(getattr(loaded, "shape", ())) != tuple(like.shape):
    raise CheckpointError(f"parameter {name} has shape {tuple(getattr(loaded, 'shape', ()))} in {directory!r}, "
                          f"expected {tuple(like.shape)}")
  return jax.numpy.asarray(loaded, dtype=like.dtype)
