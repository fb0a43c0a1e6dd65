"""The packed step inputs (`pack`, `pack_arrays`), the split model the runner jits, and sampling only when a
request samples."""

from __future__ import annotations

import numpy as np
import pytest

import pdopt
from pdopt.engine import runner as runner_lib
from pdopt.engine.batch import ChunkSpec, pack


def _pack_by_loop(chunks, page_size, shape):
  """`pack` written one sequence at a time: the obvious version the vectorized one must equal."""
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
  got, want = pack(chunks, 4, shape), _pack_by_loop(chunks, 4, shape)
  assert got.keys() == want.keys()
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_pack_arrays_round_trip():
  batch = dict(a=np.arange(6, dtype=np.int32).reshape(2, 3), b=np.asarray([1.5, -0.25], np.float32),
               c=np.asarray([2**32 - 1, 7], np.uint32))
  buffer, layout = runner_lib.pack_arrays(batch)
  assert buffer.dtype == np.int32 and buffer.size == 10
  got = runner_lib.unpack_arrays(buffer, layout)
  for key, value in batch.items():
    assert got[key].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(got[key]), value)
  with pytest.raises(TypeError, match=r"batch\['d'\] has dtype int64"):
    runner_lib.pack_arrays(dict(d=np.zeros(2, np.int64)))


def test_runners_of_one_model_shape_share_compilations():
  config = pdopt.preset("tiny")
  a = runner_lib.ModelRunner(pdopt.init_model(config, seed=0), num_pages=8, page_size=4)
  b = runner_lib.ModelRunner(pdopt.init_model(config, seed=1), num_pages=8, page_size=4)
  assert a.graphdef == b.graphdef and hash(a.graphdef) == hash(b.graphdef)
  batch = pack([ChunkSpec(token_ids=[3, 4], start=0, page_table=[1], temperature=0.0, top_k=0, top_p=1.0,
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
    return int(runner.run(pack([chunk], 4, (4, 2, 2)))[0])

  greedy = step(0.0, 0)
  assert greedy == step(0.0, 1)
  draws = {step(5.0, seed) for seed in range(12)}  # a flat distribution: seeds must draw different tokens
  assert len(draws) > 3


def test_decode_only_batches_and_their_variant():
  def spec(n, start):
    return ChunkSpec(token_ids=list(range(3, 3 + n)), start=start, page_table=[1, 2], temperature=0.0, top_k=0,
                     top_p=1.0, seed=0, token_index=0)
  decodes = pack([spec(1, 5), spec(1, 0)], 4, (4, 4, 2))  # A one-token prompt decodes as well.
  mixed = pack([spec(1, 5), spec(2, 0)], 4, (4, 4, 2))
  assert runner_lib.is_decode_only(decodes) and not runner_lib.is_decode_only(mixed)
  assert not runner_lib.is_decode_only(pack([], 4, (4, 4, 2)))  # Nothing to decode: the general step.
  runner = runner_lib.ModelRunner(pdopt.init_model(pdopt.preset("tiny"), seed=0), num_pages=8, page_size=4)
  assert runner.decode_variant is False  # CPU: the reference ignores the flag, so no variant is compiled.
  assert not runner.put(decodes).layout.decode_only
  runner.decode_variant = True
  assert runner.put(decodes).layout.decode_only and not runner.put(mixed).layout.decode_only
  assert not runner.put(decodes, decode_only=False).layout.decode_only
