"""Tensor parallelism on 8 virtual CPU devices: same logits and greedy tokens as unsharded.

The device count must be set before JAX starts, so the checks run in a child process of their own.
"""

import textwrap

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import pdopt
from pdopt.sharding import MeshConfig, make_mesh, param_shardings, validate_tensor_parallel

_CHILD = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np, pdopt
    from pdopt.sharding import MeshConfig, make_mesh, shard_model, cache_sharding
    assert len(jax.devices()) == 8
    cfg = pdopt.preset("tiny").replace(num_heads=16, num_kv_heads=8, head_dim=16, intermediate_size=352)
    ids = list(range(2, 70))
    ref = pdopt.logits(pdopt.init_model(cfg, seed=1), ids)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17)]
    params = pdopt.SamplingParams(max_tokens=6, ignore_eos=True)
    ecfg = pdopt.EngineConfig(num_pages=32, max_num_batched_tokens=64, max_model_len=256)
    base = [o.token_ids for o in pdopt.Engine(pdopt.init_model(cfg, seed=1), ecfg).generate(prompts, params)]
    for tp in (1, 2, 4, 8):
      mesh = make_mesh(MeshConfig(data=-1, model=tp))
      model = shard_model(pdopt.init_model(cfg, seed=1), mesh)
      spec = model.layers[0].attn.qkv_proj[...].sharding.spec  # whole groups (2 query heads, k, v) per device
      assert tuple(spec) == (None, "model", None, None), spec
      assert tuple(model.layers[0].mlp.gate_up_proj[...].sharding.spec) == (None, None, "model")
      assert tuple(model.layers[0].mlp.down_proj[...].sharding.spec) == ("model", None)
      out = pdopt.logits(model, ids)
      err = float(np.abs(out - ref).max() / np.abs(ref).max())
      assert err <= 1e-5, (tp, err)
      engine = pdopt.Engine(pdopt.init_model(cfg, seed=1), ecfg, mesh=mesh)
      got = [o.token_ids for o in engine.generate(prompts, params)]
      assert got == base, (tp, got, base)
      k_pages = engine.executor.runner.cache[0][0]
      assert k_pages.sharding == cache_sharding(mesh), k_pages.sharding
      assert len(k_pages.addressable_shards) == 8 and k_pages.addressable_shards[0].data.shape[0] == 8 // tp
      engine.check_no_leaks()
      print("tp", tp, "ok", err)
""")


def test_tensor_parallel_matches_unsharded(run_child):
  assert run_child(_CHILD, timeout=600).count("ok") == 4


def test_mesh_that_does_not_divide_heads_is_named():
  with pytest.raises(ValueError, match="num_kv_heads=2"):
    validate_tensor_parallel(pdopt.preset("tiny"), 4)
  with pytest.raises(ValueError, match="num_heads=14"):
    validate_tensor_parallel(pdopt.preset("qwen2.5-0.5b"), 4)


def test_mesh_shape_must_match_device_count():
  import jax
  with pytest.raises(ValueError, match="devices"):
    make_mesh(MeshConfig(data=2, model=1), jax.devices()[:1])


def test_parameters_shard_by_the_logical_axes_they_declare():
  """Every parameter's sharding comes from the logical axes given where the model creates it, through
  LOGICAL_RULES; a parameter created without them is named."""
  model = pdopt.init_model(pdopt.preset("tiny").replace(qkv_bias=True, tie_word_embeddings=False), seed=0)
  specs = param_shardings(model, make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1]))
  layer = specs["layers"][0]
  got = {"embed": specs["embed"], "lm_head": specs["lm_head"], "final_norm": specs["final_norm"]["weight"],
         "qkv_proj": layer["attn"]["qkv_proj"], "qkv_bias": layer["attn"]["qkv_bias"],
         "o_proj": layer["attn"]["o_proj"], "gate_up_proj": layer["mlp"]["gate_up_proj"],
         "down_proj": layer["mlp"]["down_proj"], "input_norm": layer["input_norm"]["weight"]}
  assert {name: tuple(s.spec) for name, s in got.items()} == {
      "embed": ("model", None), "lm_head": (None, "model"), "final_norm": (None,),
      "qkv_proj": (None, "model", None, None), "qkv_bias": ("model", None, None), "o_proj": ("model", None, None),
      "gate_up_proj": (None, None, "model"), "down_proj": ("model", None), "input_norm": (None,)}
  model.layers[1].mlp.down_proj = nnx.Param(jnp.zeros(model.layers[1].mlp.down_proj[...].shape))
  with pytest.raises(KeyError, match="layers/1/mlp/down_proj"):
    param_shardings(model, make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1]))
