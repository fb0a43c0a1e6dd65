"""Meshes for TPU slices: model groups of interconnect neighbours, data across slices, and the engine on a
data 2 x model 4 mesh (8 virtual CPU devices) serving through the TPU kernel in interpret mode, each device on
its own KV heads."""

from __future__ import annotations

import dataclasses
import random
import textwrap

import pytest

from pallas_kernels import sharded
from pdopt.sharding import mesh as mesh_lib
from pdopt.sharding import MeshConfig, data_submeshes, make_mesh


@dataclasses.dataclass(frozen=True)
class _FakeTpu:
  """What `jax.experimental.mesh_utils` reads of a TPU device."""
  id: int
  coords: tuple[int, int, int]
  slice_index: int = 0
  device_kind: str = "TPU v5 lite"
  core_on_chip: int = 0
  process_index: int = 0
  platform: str = "tpu"


def _slice(x: int, y: int, *, first_id: int = 0, slice_index: int = 0, kind: str = "TPU v5 lite") -> list[_FakeTpu]:
  return [_FakeTpu(first_id + i + x * j, (i, j, 0), slice_index, kind) for j in range(y) for i in range(x)]


def _is_ring_row(group) -> bool:
  """The chips of a model group are one row of the torus, each next to the one before."""
  xs = [d.coords[0] for d in group]
  return len({d.coords[1:] for d in group}) == 1 and all(abs(a - b) == 1 for a, b in zip(xs, xs[1:]))


def test_v5e_2x4_slice_as_data_2_model_4():
  devices = _slice(4, 2)
  random.Random(0).shuffle(devices)  # the order of a multi-host slice is by process, not by position
  mesh = make_mesh(MeshConfig(data=2, model=4), devices)
  assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (2, 4)
  assert all(_is_ring_row(row) for row in mesh.devices)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("kind", ["TPU v5 lite", "TPU v6 lite"])
def test_4x4_slice_model_groups_are_rows(kind):
  mesh = make_mesh(MeshConfig(data=4, model=4), _slice(4, 4, kind=kind))
  assert all(_is_ring_row(row) for row in mesh.devices)


def test_data_spans_slices_and_model_groups_stay_inside_one():
  devices = _slice(4, 2) + _slice(4, 2, first_id=8, slice_index=1)
  mesh = make_mesh(MeshConfig(data=4, model=4), devices)
  assert [{d.slice_index for d in row} for row in mesh.devices] == [{0}, {0}, {1}, {1}]
  assert all(_is_ring_row(row) for row in mesh.devices)
  with pytest.raises(ValueError, match="data=3 does not split over the 2 TPU slices"):
    mesh_lib.device_grid(3, 4, devices[:12] + devices[12:])


def test_data_submeshes_are_model_groups():
  devices = _slice(4, 2)
  submeshes = data_submeshes(MeshConfig(data=2, model=4), devices)
  assert [m.devices.shape for m in submeshes] == [(1, 4), (1, 4)]
  assert all(_is_ring_row(m.devices[0]) for m in submeshes)
  # Part of a slice that is no whole cuboid for mesh_utils still gets a mesh, in id order.
  part = make_mesh(MeshConfig(data=1, model=3), _slice(4, 2)[1:4])
  assert [d.id for d in part.devices.flat] == [1, 2, 3]


def test_attention_head_axis_is_the_model_axis():
  assert sharded.HEAD_AXIS == mesh_lib.MODEL


_CHILD = textwrap.dedent("""
    import dataclasses, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    from jax.experimental.pallas import tpu as pltpu
    import pallas_kernels.ragged_paged
    import pdopt
    from pallas_kernels import api
    from pdopt.sharding import MeshConfig, cache_sharding, make_mesh
    assert len(jax.devices()) == 8
    cfg = pdopt.preset("tiny").replace(num_heads=8, num_kv_heads=4, head_dim=16, intermediate_size=352)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17)]
    params = pdopt.SamplingParams(max_tokens=4, ignore_eos=True)
    ecfg = pdopt.EngineConfig(num_pages=32, page_size=8, max_num_batched_tokens=32, chunk_size=24, max_num_seqs=4,
                              max_model_len=64, token_buckets=(32,), seq_buckets=(4,), page_buckets=(8,))
    base = [o.token_ids for o in pdopt.Engine(pdopt.init_model(cfg, seed=1), ecfg).generate(prompts, params)]
    kv_heads_seen = []
    kernel = pallas_kernels.ragged_paged.ragged_paged_attention
    def spy(q, k_pages, *args, **kwargs):
      kv_heads_seen.append(k_pages.shape[0])
      return kernel(q, k_pages, *args, **kwargs)
    pallas_kernels.ragged_paged.ragged_paged_attention = spy
    mesh = make_mesh(MeshConfig(data=2, model=4))
    with api.tpu_interpret_mode(pltpu.InterpretParams(detect_races=True)):
      engine = pdopt.Engine(pdopt.init_model(cfg, seed=1), dataclasses.replace(ecfg, attention_backend="pallas"),
                            mesh=mesh)
      got = [o.token_ids for o in engine.generate(prompts, params)]
    assert got == base, (got, base)
    assert kv_heads_seen and set(kv_heads_seen) == {1}, kv_heads_seen  # 4 KV heads over model 4
    k_pages = engine.executor.runner.cache[0][0]
    assert k_pages.sharding == cache_sharding(mesh), k_pages.sharding
    engine.check_no_leaks()
    print("ok")
""")


def test_engine_on_a_data_2_model_4_mesh_through_the_tpu_kernel(run_child):
  assert "ok" in run_child(_CHILD, timeout=600)
