"""The engine: exact greedy outputs under any batching, prefix caching, preemption, no leaks, no recompiles."""

import math

import numpy as np
import pytest

import pdopt
from pdopt.engine.request import RequestStatus
from pdopt.engine.speculative import SpeculativeConfig
from pdopt.workloads import TokenIds

VOCAB = 512


@pytest.fixture(scope="module")
def model():
  return pdopt.init_model(pdopt.preset("tiny"), seed=0)


def _alone(model, prompt, max_tokens):
  """The oracle: a plain greedy loop over full-sequence logits."""
  ids = list(prompt)
  for _ in range(max_tokens):
    ids.append(int(np.argmax(pdopt.logits(model, ids)[-1])))
  return ids[len(prompt):]


def _workload(seed, n, shared_prefix):
  rng = np.random.default_rng(seed)
  prefixes = [list(rng.integers(2, VOCAB, size=k)) for k in (40, 97)]
  prompts, max_tokens, add_at = [], [], []
  for i in range(n):
    length = int(rng.integers(1, 301))
    prompt = list(rng.integers(2, VOCAB, size=length))
    if shared_prefix and i % 2:
      prompt = (prefixes[i % 4 // 2] + prompt)[:300]
    prompts.append(prompt)
    max_tokens.append(int(rng.integers(1, 9)))
    add_at.append(int(rng.integers(0, 25)))
  return prompts, max_tokens, add_at


@pytest.fixture(scope="module")
def workload(model):
  """32 prompts, every other one starting with one of two shared prefixes, and their oracle outputs."""
  prompts, max_tokens, add_at = _workload(7, 32, shared_prefix=True)
  expected = [_alone(model, p, m) for p, m in zip(prompts, max_tokens)]
  return prompts, max_tokens, add_at, expected


def _run(engine, prompts, max_tokens, add_at):
  ids = {}
  step = 0
  while len(ids) < len(prompts) or engine.has_unfinished():
    for i, at in enumerate(add_at):
      if at == step and i not in ids:
        ids[i] = engine.add_request(prompts[i], pdopt.SamplingParams(max_tokens=max_tokens[i], ignore_eos=True))
    if step > max(add_at):
      for i in range(len(prompts)):
        if i not in ids:
          ids[i] = engine.add_request(prompts[i], pdopt.SamplingParams(max_tokens=max_tokens[i], ignore_eos=True))
    engine.step()
    step += 1
    assert step < 5000, "engine made no progress"
  return [engine.requests[ids[i]] for i in range(len(prompts))]


@pytest.mark.parametrize("budget,chunk", [(16, None), (61, 23), (320, None)], ids=["one-page", "odd", "whole"])
def test_greedy_identity_under_any_batching(model, workload, budget, chunk):
  prompts, max_tokens, add_at, expected = workload
  # 20 pages of 16 tokens cannot hold the running requests: forces preemption. Few, coarse buckets keep
  # compilation short on CPU; padding inside a bucket is exercised all the same.
  engine = pdopt.Engine(model, pdopt.EngineConfig(
      num_pages=20, page_size=16, max_num_batched_tokens=budget, max_num_seqs=8, chunk_size=chunk,
      max_model_len=512, token_buckets=tuple(sorted({16, budget})), seq_buckets=(8,), page_buckets=(8, 32)))
  requests = _run(engine, prompts, max_tokens, add_at)
  for i, req in enumerate(requests):
    assert req.status is RequestStatus.FINISHED
    assert req.output_token_ids == expected[i], f"prompt {i} (len {len(prompts[i])})"
  if budget > 16:  # With one page of tokens per step, admissions are too slow to exhaust the pool.
    assert engine.num_preemptions > 0
  assert sum(r.num_cached_tokens for r in requests) > 0  # The shared prefixes hit the cache.
  engine.check_no_leaks()


@pytest.mark.parametrize("kind", [list, lambda ids: TokenIds(map(int, ids), VOCAB)], ids=["list", "TokenIds"])
def test_prefix_cache_prefills_only_the_uncached_suffix(model, kind):
  """Also with `TokenIds` prompts, whose page keys the engine takes from the prompt (kept from its second use)."""
  rng = np.random.default_rng(3)
  prefix = list(rng.integers(2, VOCAB, size=200))
  first = kind(prefix + list(rng.integers(2, VOCAB, size=30)))
  second = kind(prefix + list(rng.integers(2, VOCAB, size=50)))
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=64, max_num_batched_tokens=128, max_model_len=512))
  out1 = engine.generate([first], pdopt.SamplingParams(max_tokens=4, ignore_eos=True))
  out2 = engine.generate([second], pdopt.SamplingParams(max_tokens=4, ignore_eos=True))
  req = engine.requests[out2[0].request_id]
  cached = 200 // 16 * 16
  assert req.num_cached_tokens == cached
  assert req.num_prefill_tokens_computed == len(second) - cached
  assert out2[0].token_ids == _alone(model, second, 4)
  assert out1[0].token_ids == _alone(model, first, 4)
  engine.check_no_leaks()
  assert engine.block_manager.stats().cached > 0
  for _ in range(2):  # Submitted again: `TokenIds` keep their keys from the second use on.
    again = engine.generate([second], pdopt.SamplingParams(max_tokens=4, ignore_eos=True))
    assert engine.requests[again[0].request_id].num_cached_tokens == (len(second) - 1) // 16 * 16
    assert again[0].token_ids == out2[0].token_ids
  engine.check_no_leaks()


@pytest.mark.parametrize("decode_variant", [False, True], ids=["one_variant", "decode_variant"])
def test_no_compilation_after_warmup(model, decode_variant):
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=96, max_num_batched_tokens=64, max_num_seqs=16,
                                                  max_model_len=128, page_buckets=(8,)))
  # On GPU the runner compiles decode-only steps apart; force it here (the reference ignores the flag).
  engine.executor.runner.decode_variant = decode_variant
  engine.warmup()
  compiled = engine.executor.runner.num_compilations
  rng = np.random.default_rng(5)
  for i in range(200):
    engine.add_request(list(rng.integers(2, VOCAB, size=int(rng.integers(1, 60)))),
                       pdopt.SamplingParams(max_tokens=int(rng.integers(1, 6)), ignore_eos=True))
    if i % 3 == 0:
      engine.step()
  while engine.has_unfinished():
    engine.step()
  assert engine.executor.runner.num_compilations == compiled
  assert all(r.status is RequestStatus.FINISHED for r in engine.requests.values())
  engine.check_no_leaks()


@pytest.mark.parametrize("extra_programs", ["chained", "draft"])
def test_warmup_compiles_each_program_once(extra_programs):
  # Warm-up compiles every program in parallel threads first, then runs each: the runs must find them
  # compiled (jit reuses what the ahead-of-time compilation made), so XLA compiles each program once. A
  # vocabulary per case that no other test uses, so the shared jitted programs have no entries for it yet.
  from jax._src import dispatch, monitoring  # pylint: disable=import-outside-toplevel
  from pdopt.engine import runner as runner_lib  # pylint: disable=import-outside-toplevel
  vocab = {"chained": 523, "draft": 521}[extra_programs]
  model = pdopt.init_model(pdopt.preset("tiny", vocab_size=vocab, num_layers=1), seed=0)
  small = dict(num_pages=64, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64, token_buckets=(64,),
               seq_buckets=(8,), page_buckets=(4,))  # one shape bucket: the variants make the programs
  if extra_programs == "chained":  # the 1- and 2-step programs of async decoding
    engine = pdopt.Engine(model, pdopt.EngineConfig(async_decode=True, num_scheduler_steps=2, **small))
  else:  # verification, and the draft model's passes on its own runner
    engine = pdopt.Engine(model, pdopt.EngineConfig(
        speculative=SpeculativeConfig(method="draft", num_speculative_tokens=2), **small),
        draft_model=pdopt.init_model(pdopt.preset("tiny", vocab_size=vocab, num_layers=1), seed=1))
  engine.executor.runner.decode_variant = True
  compiles = []
  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == dispatch.BACKEND_COMPILE_EVENT:
      compiles.append(event)
  samplers = runner_lib._sample._cache_size()  # pylint: disable=protected-access
  monitoring.register_event_duration_secs_listener(listener)
  try:
    programs = engine.warmup()
  finally:
    monitoring.unregister_event_duration_listener(listener)
  samplers = runner_lib._sample._cache_size() - samplers  # pylint: disable=protected-access
  assert programs >= 6
  assert len(compiles) == programs + samplers


def test_sampler_compiles_nothing_after_warmup():
  # A vocabulary no other test uses, so the shared sampling program has no entries for these shapes yet.
  from pdopt.engine import runner as runner_lib  # pylint: disable=import-outside-toplevel
  model = pdopt.init_model(pdopt.preset("tiny", vocab_size=517, num_layers=1), seed=0)
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=64, max_num_batched_tokens=64, max_num_seqs=8,
                                                  max_model_len=64, page_buckets=(4,), seq_buckets=(4, 8)))
  engine.warmup()
  compiled = runner_lib._sample._cache_size()  # pylint: disable=protected-access
  rng = np.random.default_rng(2)
  engine.generate([list(rng.integers(2, 517, size=n)) for n in (3, 20, 40, 7, 9, 30)],
                  [pdopt.SamplingParams(max_tokens=5, temperature=0.8, seed=i, ignore_eos=True) for i in range(6)])
  assert runner_lib._sample._cache_size() == compiled  # pylint: disable=protected-access
  engine.check_no_leaks()


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
  prompt = [5, 6, 7, 8]
  def sample(seed, others):
    engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=32, max_model_len=256))
    for o in range(others):  # Different batch company must not change the tokens.
      engine.add_request([9 + o] * (3 + o), pdopt.SamplingParams(max_tokens=5, temperature=1.0, seed=o))
    rid = engine.add_request(prompt, pdopt.SamplingParams(max_tokens=24, temperature=1.5, top_k=50, top_p=0.95,
                                                          seed=seed, ignore_eos=True))
    while engine.has_unfinished():
      engine.step()
    return engine.requests[rid].output_token_ids
  a, b, c = sample(1, 0), sample(1, 3), sample(2, 0)
  assert a == b
  assert a != c


def test_top_k_one_is_greedy(model):
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=32, max_model_len=256))
  out = engine.generate([[3, 4, 5]], pdopt.SamplingParams(max_tokens=6, temperature=0.8, top_k=1, seed=4,
                                                          ignore_eos=True))
  assert out[0].token_ids == _alone(model, [3, 4, 5], 6)


@pytest.mark.parametrize("prompt,params,match", [
    ([], {}, "empty"),
    ([1, 512], {}, "512"),
    ([1, -1], {}, "-1"),
    ([1, 2.5], {}, "2.5"),
    ([1, True], {}, "True"),
    (TokenIds([], 10), {}, "empty"),
    (TokenIds([1, 600], 1000), {}, "600"),  # Drawn below a bound past the vocabulary: checked id by id.
    ("abc", {}, "sequence of integer"),
    ([1] * 250, dict(max_tokens=10), "max_model_len"),
    ([1], dict(max_tokens=0), "max_tokens"),
    ([1], dict(max_tokens=2.0), "max_tokens"),
    ([1], dict(temperature=-1.0), "temperature"),
    ([1], dict(temperature=float("nan")), "temperature"),
    ([1], dict(top_p=0.0), "top_p"),
    ([1], dict(top_p=1.5), "top_p"),
    ([1], dict(top_k=-2), "top_k"),
    ([1], dict(seed=2**32), "seed"),
    ([1], dict(stop_token_ids=(3, 1.5)), "stop_token_ids"),
])
def test_bad_input_is_named_and_others_keep_serving(model, prompt, params, match):
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=32, max_model_len=256))
  good = engine.add_request([7, 8, 9], pdopt.SamplingParams(max_tokens=3, ignore_eos=True))
  engine.step()
  with pytest.raises(ValueError, match=match):
    engine.add_request(prompt, pdopt.SamplingParams(**params))  # Bad sampling parameters fail when built.
  while engine.has_unfinished():
    engine.step()
  assert engine.requests[good].output_token_ids == _alone(model, [7, 8, 9], 3)
  assert len(engine.requests) == 1
  engine.check_no_leaks()


def test_token_ids_within_the_vocabulary_are_served_as_lists_are(model):
  prompt = TokenIds([7, 8, 9], model.config.vocab_size)
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=32, max_model_len=256))
  out = engine.generate([prompt], pdopt.SamplingParams(max_tokens=3, ignore_eos=True))
  assert out[0].token_ids == _alone(model, [7, 8, 9], 3)


def test_request_that_can_never_fit_is_refused_with_a_reason(model):
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=4, page_size=16, max_model_len=256))
  with pytest.raises(ValueError, match="needs 7 KV pages .* the pool has 4"):
    engine.add_request(list(range(2, 100)), pdopt.SamplingParams(max_tokens=8))
  small = engine.add_request([2, 3], pdopt.SamplingParams(max_tokens=3, ignore_eos=True))
  while engine.has_unfinished():
    engine.step()
  assert engine.requests[small].status is RequestStatus.FINISHED
  assert [r.status for r in engine.records()] == ["finished"]
  engine.check_no_leaks()


def test_abort_frees_pages_and_ends_once(model):
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=32, max_model_len=256))
  a = engine.add_request(list(range(2, 60)), pdopt.SamplingParams(max_tokens=50, ignore_eos=True))
  b = engine.add_request([4, 5], pdopt.SamplingParams(max_tokens=4, ignore_eos=True))
  engine.step()
  engine.step()
  assert engine.abort(a)
  assert not engine.abort(a)
  assert not engine.abort("unknown")
  while engine.has_unfinished():
    engine.step()
  assert engine.requests[a].status is RequestStatus.ABORTED
  assert engine.requests[b].output_token_ids == _alone(model, [4, 5], 4)
  engine.check_no_leaks()


def test_timestamps_are_ordered(model):
  t = [0.0]
  def clock():
    t[0] += 0.01
    return t[0]
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=32, max_model_len=256), clock=clock)
  engine.generate([[2, 3, 4], list(range(2, 40))], pdopt.SamplingParams(max_tokens=5, ignore_eos=True))
  for rec in engine.records():
    assert rec.arrival_time <= rec.first_scheduled_time <= rec.first_token_time == rec.token_times[0]
    assert list(rec.token_times) == sorted(rec.token_times) and len(rec.token_times) == 5
    assert rec.finish_time == rec.token_times[-1]


def test_a_step_output_keeps_what_it_showed_when_returned(model):
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=32, max_model_len=256))
  rid = engine.add_request([2, 3, 4], pdopt.SamplingParams(max_tokens=5, ignore_eos=True))
  outputs = []
  while engine.has_unfinished():
    outputs += engine.step()
  final = engine.requests[rid].output_token_ids
  assert [o.token_ids for o in outputs] == [final[:n] for n in range(1, 6)]
  assert [o.finished for o in outputs] == [False] * 4 + [True] and outputs[-1].finish_reason == "length"
  assert outputs[0].status is RequestStatus.RUNNING and outputs[-1].status is RequestStatus.FINISHED


def test_stop_tokens_and_eos(model):
  expected = _alone(model, [10, 11, 12], 8)
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=32, max_model_len=256))
  out = engine.generate([[10, 11, 12]], pdopt.SamplingParams(max_tokens=8, stop_token_ids=(expected[2],),
                                                             ignore_eos=True))
  assert out[0].token_ids == expected[:expected.index(expected[2]) + 1]
  assert out[0].finish_reason == "stop"


@pytest.mark.parametrize("fields,match", [
    (dict(policy="fastest"), "EngineConfig.policy='fastest'; valid: chunked"),
    (dict(policy="fifo"), "EngineConfig.policy='fifo'"),
    (dict(attention_backend="palas"), "EngineConfig.attention_backend='palas'; valid: auto, reference, pallas"),
    (dict(kv_cache_dtype="int4"), "kv_cache_dtype='int4'; valid: auto, int8, fp8"),
    (dict(page_size=0), "EngineConfig.page_size=0"),
    (dict(num_pages=2.5), "EngineConfig.num_pages=2.5"),
    (dict(max_num_seqs=True), "EngineConfig.max_num_seqs=True"),
    (dict(chunk_size=-1), "EngineConfig.chunk_size=-1"),
    (dict(tpot_slo_ms=0), "EngineConfig.tpot_slo_ms=0"),
    (dict(token_buckets=(64, 16)), "EngineConfig.token_buckets"),
    (dict(token_buckets=(16, 64)), "EngineConfig.token_buckets=.*512"),
    (dict(enable_prefix_caching="yes"), "EngineConfig.enable_prefix_caching='yes'"),
    (dict(speculative="ngram"), "EngineConfig.speculative='ngram'"),
])
def test_config_errors_name_field_value_and_valid_values(fields, match):
  with pytest.raises(ValueError, match=match):
    pdopt.EngineConfig(**fields)  # At construction, before any engine or model.


def test_attention_backends_are_the_kernel_apis():
  from pallas_kernels.api import Backend  # pylint: disable=import-outside-toplevel
  from pdopt.engine.config import ATTENTION_BACKENDS  # pylint: disable=import-outside-toplevel
  assert ATTENTION_BACKENDS == tuple(b.value for b in Backend)


def test_write_kv_drops_padding_and_keeps_other_slots():
  import jax.numpy as jnp
  from pdopt.cache.kv_cache import write_kv
  pages = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.float32).reshape(2, 3, 4, 2)
  new = -jnp.ones((3, 2, 2))
  out = np.asarray(write_kv(pages, new, jnp.asarray([5, -1, 0], jnp.int32)))
  ref = np.asarray(pages).copy()
  ref[:, 1, 1, :] = -1
  ref[:, 0, 0, :] = -1
  np.testing.assert_array_equal(out, ref)
  assert math.isfinite(out.sum())


def test_warmup_covers_every_shape_pick_can_return():
  from pdopt.engine.batch import Buckets
  b = Buckets(tokens=(16, 64), seqs=(8, 32), pages=(4,))
  shapes = set(b.all_shapes())
  for tokens in range(1, 65):
    for seqs in range(1, min(tokens, 32) + 1):
      assert b.pick(tokens, seqs, 3) in shapes
  decode_shapes = b.decode_shapes(max_seqs=32)
  assert set(decode_shapes) == {b.pick(n, n, 3) for n in range(1, 33)} == {(16, 8, 4), (16, 32, 4), (64, 32, 4)}


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_kv_cache_serves_close_to_unquantized(model, kind):
  prompt = list(range(2, 80))
  ref = pdopt.logits(model, prompt)
  got = pdopt.logits(model, prompt, kv_quant=kind)
  assert np.abs(got - ref).max() / np.abs(ref).max() < (2e-2 if kind == "int8" else 8e-2)
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=32, max_model_len=256, kv_cache_dtype=kind))
  k_pages = engine.executor.runner.cache[0][0]
  assert k_pages.dtype == ("int8" if kind == "int8" else "float8_e4m3fn")
  out = engine.generate([prompt], pdopt.SamplingParams(max_tokens=3, ignore_eos=True))
  # The engine's tokens are the greedy tokens of the quantized-cache model, computed from scratch.
  ids = list(prompt)
  for _ in range(3):
    ids.append(int(np.argmax(pdopt.logits(model, ids, kv_quant=kind)[-1])))
  assert out[0].token_ids == ids[len(prompt):]
  engine.check_no_leaks()
