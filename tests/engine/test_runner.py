"""The step's inputs (`batch.build`, `StepBatch` and its trip to the device), the split model the runner jits,
and sampling only when a request samples."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import pdopt
from pdopt.engine import runner as runner_lib
from pdopt.engine.batch import ChainInputs, ChunkSpec, StepBatch, VerifyInputs, build


def _fields(batch: StepBatch) -> dict[str, np.ndarray]:
  return dict(token_ids=batch.token_ids, positions=batch.positions, slot_mapping=batch.slot_mapping,
              cu_q_lens=batch.cu_q_lens, kv_lens=batch.kv_lens, page_table=batch.page_table, num_seqs=batch.num_seqs,
              logits_indices=batch.logits_indices, temperature=batch.sampling.temperature,
              top_k=batch.sampling.top_k, top_p=batch.sampling.top_p, seeds=batch.sampling.seeds,
              token_index=batch.sampling.token_index)


def _pack_by_loop(chunks, page_size, shape):
  """`build` written one sequence at a time: the obvious version the vectorized one must equal."""
  t_pad, s_pad, p_pad = shape
  out = dict(token_ids=np.zeros(t_pad, np.int32), positions=np.zeros(t_pad, np.int32),
             slot_mapping=np.full(t_pad, -1, np.int32), cu_q_lens=np.zeros(s_pad + 1, np.int32),
             kv_lens=np.zeros(s_pad, np.int32), page_table=np.zeros((s_pad, p_pad), np.int32),
             logits_indices=np.zeros(s_pad, np.int32), temperature=np.zeros(s_pad, np.float32),
             top_k=np.zeros(s_pad, np.int32), top_p=np.ones(s_pad, np.float32), seeds=np.zeros(s_pad, np.uint32),
             token_index=np.zeros(s_pad, np.int32), num_seqs=np.asarray([len(chunks)], np.int32))
  t = 0
  for s, c in enumerate(chunks):
    for i, token in enumerate(c.token_ids):
      pos = c.start + i
      out["token_ids"][t + i] = token
      out["positions"][t + i] = pos
      out["slot_mapping"][t + i] = c.page_table[pos // page_size] * page_size + pos % page_size
    out["page_table"][s, :len(c.page_table)] = c.page_table
    out["kv_lens"][s] = c.start + len(c.token_ids)
    t += len(c.token_ids)
    out["cu_q_lens"][s + 1:] = t
    out["logits_indices"][s] = t - 1
    out["temperature"][s], out["top_k"][s], out["top_p"][s] = c.temperature, c.top_k, c.top_p
    out["seeds"][s], out["token_index"][s] = c.seed, c.token_index
  return out


def test_pack_matches_the_loop():
  rng = np.random.default_rng(0)
  chunks = []
  for _ in range(7):
    start, n = int(rng.integers(0, 40)), int(rng.integers(1, 12))
    pages = rng.permutation(100)[:(start + n + 3) // 4].tolist()
    chunks.append(ChunkSpec(token_ids=rng.integers(0, 50, n).tolist(), start=start, page_table=pages,
                            temperature=float(rng.random()), top_k=int(rng.integers(0, 9)), top_p=0.9,
                            seed=int(rng.integers(0, 2**32)), token_index=int(rng.integers(0, 30))))
  shape = (sum(len(c.token_ids) for c in chunks) + 5, 9, 16)
  got, want = _fields(build(chunks, 4, shape)), _pack_by_loop(chunks, 4, shape)
  assert got.keys() == want.keys()
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_transfer_round_trip_with_groups_and_device_leaves():
  chunk = ChunkSpec(token_ids=[3, 4, 5], start=2, page_table=[1, 6], temperature=0.5, top_k=3, top_p=0.9,
                    seed=2**32 - 1, token_index=4)
  prev = jax.numpy.asarray([7, 8], jax.numpy.int32)  # Another program's output, already on the device.
  batch = build([chunk], 4, (4, 2, 2), decode_only=True).replace(
      chain=ChainInputs(prev_rows=np.asarray([1, -1, -1, -1], np.int32), prev_tokens=prev),
      verify=VerifyInputs(num_drafts=np.asarray([2, 0], np.int32), draft_tokens=np.asarray([[9, 9], [0, 0]], np.int32)))
  buffer, device, layout = batch.to_transfer()
  assert buffer.dtype == np.int32 and len(device) == 1 and device[0] is prev
  got = StepBatch.from_transfer(jax.numpy.asarray(buffer), device, layout)
  assert got.decode_only and got.draft is None and got.verify.draft_rows is None
  want_leaves, want_tree = jax.tree_util.tree_flatten(batch)
  got_leaves, got_tree = jax.tree_util.tree_flatten(got)
  assert got_tree == want_tree
  for g, w in zip(got_leaves, want_leaves):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  assert hash(layout) == hash(build([chunk], 4, (4, 2, 2), True).replace(chain=batch.chain, verify=batch.verify)
                              .to_transfer()[2])  # A jit static argument: equal batches, equal layouts.
  with pytest.raises(TypeError, match="dtype int64"):
    batch.replace(num_seqs=np.zeros(1, np.int64)).to_transfer()


def test_runners_of_one_model_shape_share_compilations():
  config = pdopt.preset("tiny")
  a = runner_lib.ModelRunner(pdopt.init_model(config, seed=0), num_pages=8, page_size=4)
  b = runner_lib.ModelRunner(pdopt.init_model(config, seed=1), num_pages=8, page_size=4)
  # One holder: jit compares a step's static arguments with those it compiled for at every call, and an equal
  # but distinct holder would make it walk both module graphs each time (a later engine's steps slower).
  assert a.graphdef is b.graphdef
  other = runner_lib.ModelRunner(pdopt.init_model(pdopt.preset("tiny", num_layers=1), seed=0), num_pages=8,
                                 page_size=4)
  assert other.graphdef != a.graphdef
  batch = build([ChunkSpec(token_ids=[3, 4], start=0, page_table=[1], temperature=0.0, top_k=0, top_p=1.0,
                           seed=0, token_index=0)], 4, (4, 2, 2))
  a.run(batch)
  before = a.num_compilations
  b.run(batch)
  assert b.num_compilations == before


def test_sampling_runs_only_for_batches_that_sample():
  model = pdopt.init_model(pdopt.preset("tiny"), seed=0)
  runner = runner_lib.ModelRunner(model, num_pages=8, page_size=4)

  def step(temperature, seed):
    chunk = ChunkSpec(token_ids=[5, 6, 7], start=0, page_table=[2], temperature=temperature, top_k=0, top_p=1.0,
                      seed=seed, token_index=0)
    return int(runner.run(build([chunk], 4, (4, 2, 2)))[0])

  greedy = step(0.0, 0)
  assert greedy == step(0.0, 1)
  draws = {step(5.0, seed) for seed in range(12)}  # a flat distribution: seeds must draw different tokens
  assert len(draws) > 3


def test_decode_only_variant_only_where_the_runner_compiles_it():
  spec = ChunkSpec(token_ids=[3], start=5, page_table=[1, 2], temperature=0.0, top_k=0, top_p=1.0, seed=0,
                   token_index=0)
  decodes = build([spec, spec], 4, (4, 4, 2), decode_only=True)
  runner = runner_lib.ModelRunner(pdopt.init_model(pdopt.preset("tiny"), seed=0), num_pages=8, page_size=4)
  assert runner.decode_variant is False  # CPU: the reference ignores the flag, so no variant is compiled.
  assert not jax.tree_util.tree_structure(decodes.replace(decode_only=False)) == jax.tree_util.tree_structure(decodes)
  assert runner.put(decodes).layout.treedef == jax.tree_util.tree_structure(decodes.replace(decode_only=False))
  runner.decode_variant = True
  assert runner.put(decodes).layout.treedef == jax.tree_util.tree_structure(decodes)
