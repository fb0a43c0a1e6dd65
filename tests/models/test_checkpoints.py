"""Orbax checkpoints: bit-exact round trip, clear errors for missing or corrupt ones."""

import json
import os
import shutil

import numpy as np
import pytest

import pdopt
from pdopt.models import checkpoints


@pytest.fixture(scope="module")
def model():
  return pdopt.init_model(pdopt.preset("tiny", dtype="bfloat16"), seed=3)


def _leaves(m):
  from flax import nnx
  import jax
  return jax.tree_util.tree_leaves(nnx.state(m, nnx.Param).to_pure_dict())


def test_round_trip_is_bit_exact(model, tmp_path):
  checkpoints.save(model, tmp_path / "ckpt")
  restored = checkpoints.restore(tmp_path / "ckpt")
  assert restored.config == model.config
  for a, b in zip(_leaves(model), _leaves(restored), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a.astype("float32")), np.asarray(b.astype("float32")))
  np.testing.assert_array_equal(pdopt.logits(model, [5, 6, 7]), pdopt.logits(restored, [5, 6, 7]))


def test_restores_the_layout_of_separate_projections(tmp_path):
  """Checkpoints saved before q/k/v and gate/up were merged into one weight each load into today's layout."""
  import orbax.checkpoint as ocp
  from flax import nnx
  model = pdopt.init_model(pdopt.preset("tiny", qkv_bias=True), seed=4)  # 4 query heads, 2 KV heads
  for layer in model.layers:  # non-zero biases, so that their placement is checked too
    layer.attn.qkv_bias[...] = np.random.default_rng(0).normal(size=layer.attn.qkv_bias.shape).astype("float32")
  checkpoints.save(model, tmp_path / "ckpt")
  tree = nnx.state(model, nnx.Param).to_pure_dict()
  for layer in tree["layers"].values():
    attn, mlp = layer["attn"], layer["mlp"]
    qkv, bias = np.asarray(attn.pop("qkv_proj")), np.asarray(attn.pop("qkv_bias"))  # [E, K, G + 2, D], [K, G + 2, D]
    e, kv_heads, group, d = qkv.shape[0], qkv.shape[1], qkv.shape[2] - 2, qkv.shape[3]
    attn.update(q_proj=qkv[:, :, :group].reshape(e, kv_heads * group, d), k_proj=qkv[:, :, group],
                v_proj=qkv[:, :, group + 1], q_bias=bias[:, :group].reshape(kv_heads * group, d),
                k_bias=bias[:, group], v_bias=bias[:, group + 1])
    gate_up = np.asarray(mlp.pop("gate_up_proj"))
    mlp.update(gate_proj=gate_up[:, 0], up_proj=gate_up[:, 1])
  shutil.rmtree(tmp_path / "ckpt" / "params")
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "ckpt" / "params"), tree)
  restored = checkpoints.restore(tmp_path / "ckpt")
  for a, b in zip(_leaves(model), _leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_directory(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
    checkpoints.restore(tmp_path / "nope")


def test_missing_params(model, tmp_path):
  checkpoints.save(model, tmp_path / "c")
  shutil.rmtree(tmp_path / "c" / "params")
  with pytest.raises(checkpoints.CheckpointError, match="params"):
    checkpoints.restore(tmp_path / "c")


def test_corrupt_config(model, tmp_path):
  checkpoints.save(model, tmp_path / "c")
  (tmp_path / "c" / "model_config.json").write_text("{not json")
  with pytest.raises(checkpoints.CheckpointError, match="corrupt"):
    checkpoints.restore(tmp_path / "c")


def test_corrupt_params(model, tmp_path):
  checkpoints.save(model, tmp_path / "c")
  for root, _, files in os.walk(tmp_path / "c" / "params"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpoints.CheckpointError, match="cannot read parameters"):
    checkpoints.restore(tmp_path / "c")


def test_config_params_mismatch_names_the_parameter(model, tmp_path):
  checkpoints.save(model, tmp_path / "c")
  path = tmp_path / "c" / "model_config.json"
  cfg = json.loads(path.read_text())
  cfg["intermediate_size"] = 352
  path.write_text(json.dumps(cfg))
  with pytest.raises(checkpoints.CheckpointError, match=r"mlp/\w+_proj has shape"):
    checkpoints.restore(tmp_path / "c")
