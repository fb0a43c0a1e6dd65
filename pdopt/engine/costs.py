"""The step-cost model of a served model (`pdopt.scheduling.step_cost`): its sizes, and the model an engine
plans with when it is given none (the shipped fitted file for this model shape and device, else the
roofline of the device's datasheet)."""

from __future__ import annotations

import math
import pathlib

import jax.numpy as jnp

from pdopt.models.config import ModelConfig
from pdopt.scheduling.step_cost import AllReduce, DeviceSpec, ModelSizes, StepCostModel, datasheet

# Fitted cost files that ship with pdopt (`python -m experiments.profile_steps`), one per model shape and device.
SHIPPED_DIR = pathlib.Path(__file__).resolve().parent.parent / "step_costs"


def model_sizes(config: ModelConfig, kv_cache_dtype: str = "auto", tensor_parallel: int = 1) -> ModelSizes:
  """One tensor-parallel shard's sizes of `config` with its KV cache stored as `kv_cache_dtype` ("auto": the
  model's dtype; "int8" / "fp8": one byte per value and a float32 scale per (KV head, token))."""
  e, v, d = config.hidden_size, config.vocab_size, config.head_dim
  itemsize = jnp.dtype(config.dtype).itemsize
  # A step reads every weight once, except the input embedding of which it gathers its tokens' rows; tied
  # embeddings are read whole as the output projection.
  read_params = config.num_params() - (0 if config.tie_word_embeddings else v * e)
  per_layer = (e * d * (config.num_heads + 2 * config.num_kv_heads) + config.num_heads * d * e
               + 3 * e * config.intermediate_size)
  kv_value = itemsize if kv_cache_dtype == "auto" else 1
  kv_token = 2 * config.num_layers * config.num_kv_heads * (d * kv_value + (0 if kv_cache_dtype == "auto" else 4))
  tp = tensor_parallel
  return ModelSizes(weight_bytes=read_params * itemsize / tp, flops_per_token=2 * per_layer * config.num_layers / tp,
                    flops_per_seq=2 * e * v / tp, attention_flops=4 * config.num_heads * d * config.num_layers / tp,
                    kv_bytes_per_token=kv_token / tp, tensor_parallel=tp)


def shipped(sizes: ModelSizes, device_kind: str) -> StepCostModel | None:
  """The shipped cost file fitted for these sizes on a device of this kind, or None."""
  for path in sorted(SHIPPED_DIR.glob("*.json")):
    model = StepCostModel.load(path)
    if model.device.name == device_kind and _same(model.sizes, sizes):
      return model
  return None


def default_step_cost(config: ModelConfig, kv_cache_dtype: str, tensor_parallel: int, device_kind: str,
                      device: DeviceSpec | None = None) -> StepCostModel:
  """The shipped fitted model for this model shape on `device_kind`, or the roofline of `device` (default: the
  datasheet of `device_kind`); its `kind` and `source` say which."""
  sizes = model_sizes(config, kv_cache_dtype, tensor_parallel)
  return shipped(sizes, device_kind) or StepCostModel.roofline(sizes, device or datasheet(device_kind))


def _same(a: ModelSizes, b: ModelSizes) -> bool:
  return all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(vars(a).values(), vars(b).values()))


def allreduce(config: ModelConfig, gbps: float, latency_s: float, tp: int) -> AllReduce:
  """The all-reduces of a tensor-parallel step of `config` (two per layer, one hidden vector per token in the
  model's dtype) at `gbps` bus bandwidth and `latency_s` each, for scaling a step-cost model to degree `tp`."""
  return AllReduce(per_step=2 * config.num_layers,
                   bytes_per_token=config.hidden_size * jnp.dtype(config.dtype).itemsize, bandwidth=gbps * 1e9,
                   latency=latency_s, source=f"{gbps} GB/s bus bandwidth at TP {tp}")
