"""A 2-D device mesh with `data` and `model` axes built from config, laid out on the devices' interconnect.

`model` (tensor parallelism) all-reduces twice per layer, `data` does not communicate within an engine, so the
devices of one `model` group should be neighbours: on a TPU slice, chips next to each other on the ICI torus
(e.g. a 2x4 v5e slice as data 2 x model 4: each model group is a row of 4 chips, in ring order); across slices
(devices with several `slice_index` values), `data` spans the slices (DCN) and every model group stays inside
one. `jax.experimental.mesh_utils` knows the physical layouts; on CPUs and GPUs the devices keep their order.
`data_submeshes` cuts the mesh into one mesh per data index, for one engine per data slice.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

DATA, MODEL = "data", "model"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape. `model` is the tensor-parallel degree; `data` replicates (one engine per data slice).

  A value of -1 for `data` takes every device not used by `model`.
  """
  data: int = -1
  model: int = 1


def device_grid(data: int, model: int, devices: Sequence[jax.Device]) -> np.ndarray:
  """The devices as a [data, model] array whose rows (model groups) are interconnect neighbours.

  Args:
    data, model: the axis sizes; data * model == len(devices).
    devices: the devices, in any order.

  Returns:
    An object array of devices, shape [data, model].

  Raises:
    ValueError: devices of several TPU slices that `data` cannot split evenly across the slices (named).
  """
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  if len(slices) > 1:
    if data % len(slices):
      raise ValueError(f"MeshConfig.data={data} does not split over the {len(slices)} TPU slices of the devices")
    return mesh_utils.create_hybrid_device_mesh((data // len(slices), model), (len(slices), 1), devices,
                                                allow_split_physical_axes=True)
  if devices[0].platform != "tpu":
    return np.asarray(devices, dtype=object).reshape(data, model)
  try:
    return mesh_utils.create_device_mesh((data, model), devices, allow_split_physical_axes=True)
  except (ValueError, AssertionError, NotImplementedError):
    # Not a whole cuboid of chips (e.g. a part of a slice): mesh_utils has no layout for it (it asserts); the
    # devices in id order, which on TPUs follows their coordinates.
    return np.asarray(sorted(devices, key=lambda d: d.id), dtype=object).reshape(data, model)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh over `devices` (default: all devices of the default backend), laid out by `device_grid`.

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
  return Mesh(device_grid(data, model, devices), (DATA, MODEL))


def data_submeshes(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> list[Mesh]:
  """One mesh per data index of `make_mesh(config, devices)` (data 1 x model each): the devices of one engine
  per data slice, each a model group of interconnect neighbours."""
  grid = make_mesh(config, devices).devices
  return [Mesh(grid[i:i + 1], (DATA, MODEL)) for i in range(grid.shape[0])]
