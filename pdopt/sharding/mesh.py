"""A 2-D device mesh with `data` and `model` axes built from config."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DATA, MODEL = "data", "model"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape. `model` is the tensor-parallel degree; `data` replicates (one engine per data slice).

  A value of -1 for `data` takes every device not used by `model`.
  """
  data: int = -1
  model: int = 1


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh over `devices` (default: all devices of the default backend).

  Raises:
    ValueError: the axis sizes do not multiply to the number of devices (named with the counts).
  """
  devices = list(devices if devices is not None else jax.devices())
  model = config.model
  if model < 1 or len(devices) % model:
    raise ValueError(f"MeshConfig.model={model} does not divide the {len(devices)} devices")
  data = len(devices) // model if config.data == -1 else config.data
  if data * model != len(devices):
    raise ValueError(f"MeshConfig data={config.data} x model={model} != {len(devices)} devices")
  return Mesh(np.asarray(devices, dtype=object).reshape(data, model), (DATA, MODEL))
