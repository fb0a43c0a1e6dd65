"""`make_executor`: the device executor an `EngineConfig` asks for (synchronous, asynchronous or
speculative), built on a `ModelRunner` that holds the model and its KV cache."""

from __future__ import annotations

from jax.sharding import Mesh

from pdopt import sharding
from pdopt.cache.block_manager import BlockManager
from pdopt.engine.async_executor import AsyncExecutor
from pdopt.engine.batch import Buckets
from pdopt.engine.config import EngineConfig
from pdopt.engine.device_executor import DeviceExecutor
from pdopt.engine.runner import ModelRunner
from pdopt.engine.speculative.executor import SpeculativeExecutor
from pdopt.models.config import ModelConfig
from pdopt.models.transformer import Transformer


def make_executor(model: Transformer | ModelConfig, config: EngineConfig, block_manager: BlockManager,
                  buckets: Buckets, max_model_len: int, mesh: Mesh | None = None,
                  draft_model: Transformer | None = None) -> DeviceExecutor:
  """The executor of `config` for `model` (sharded onto `mesh` first, if given).

  Raises:
    ValueError: a model given only by its config (a device needs weights), or a combination the executors do
      not serve (speculation or `async_decode` on a mesh, a draft model without speculation), named.
  """
  if isinstance(model, ModelConfig):
    raise ValueError("an engine on a device needs a Transformer (weights), not only its ModelConfig; the "
                     "simulator passes its own executor")
  if mesh is not None and (config.speculative is not None or config.async_decode):
    raise ValueError("EngineConfig.speculative and EngineConfig.async_decode do not run on a mesh yet")
  if draft_model is not None and config.speculative is None:
    raise ValueError("draft_model given but EngineConfig.speculative is None")
  if mesh is not None:
    sharding.shard_model(model, mesh)
  runner = ModelRunner(model, config.num_pages, config.page_size, config.attention_backend, mesh,
                       kv_quant=config.kv_quant)
  common = (runner, block_manager, buckets, config.max_num_seqs)
  if config.speculative is not None:
    return SpeculativeExecutor(*common, config=config.speculative, draft=draft_model,
                               max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=max_model_len)
  if config.async_decode:
    return AsyncExecutor(*common, num_scheduler_steps=config.num_scheduler_steps)
  return DeviceExecutor(*common)
