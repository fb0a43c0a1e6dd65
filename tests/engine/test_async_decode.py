"""EngineConfig.async_decode: the next decode step dispatched before the previous one's tokens are read.
Outputs, finish reasons and page accounting must equal the synchronous engine's under every policy."""

import dataclasses

import numpy as np
import pytest

import pdopt
from pdopt.engine.speculative import SpeculativeConfig

VOCAB = 512
POLICIES = ("chunked", "prefill_first", "decode_first", "slo_aware")
SMALL = dict(page_size=16, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=160, token_buckets=(16, 64),
             seq_buckets=(4, 8), page_buckets=(10,), ttft_slo_ms=1e6, tpot_slo_ms=1e6)


@pytest.fixture(scope="module")
def model():
  return pdopt.init_model(pdopt.preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def workload(model):
  """Prompts of 1-90 tokens arriving over time, greedy and seeded sampled requests, long and short outputs,
  stop tokens taken from the middle of the outputs (so they stop while the next step is in flight), and one
  request aborted while decoding."""
  rng = np.random.default_rng(3)
  prompts = [list(rng.integers(2, VOCAB, size=int(rng.integers(1, 90)))) for _ in range(10)]
  params = [pdopt.SamplingParams(max_tokens=int(rng.integers(1, 40)), ignore_eos=True,
                                 temperature=0.9 if i % 3 == 1 else 0.0, seed=i) for i in range(len(prompts))]
  params[9] = dataclasses.replace(params[9], max_tokens=60)  # The one aborted mid-decode.
  reference = pdopt.Engine(model, pdopt.EngineConfig(num_pages=40, **SMALL)).generate(prompts, params)
  for i, out in enumerate(reference):
    if i % 2 == 0 and len(out.token_ids) > 4:
      params[i] = dataclasses.replace(params[i], stop_token_ids=(out.token_ids[len(out.token_ids) // 2],))
  add_at = [int(a) for a in rng.integers(0, 30, size=len(prompts))]
  add_at[9] = 0
  return prompts, params, add_at


def _serve(engine, prompts, params, add_at, abort=(9, 30)):
  ids, step = {}, 0
  while len(ids) < len(prompts) or engine.has_unfinished():
    for i, at in enumerate(add_at):
      if at <= step and i not in ids:
        ids[i] = engine.add_request(prompts[i], params[i])
    if step == abort[1] and abort[0] in ids:
      engine.abort(ids[abort[0]])
    engine.step()
    engine.check_no_leaks()
    step += 1
    assert step < 3000, "engine made no progress"
  engine.check_no_leaks()
  return [engine.requests[ids[i]] for i in range(len(prompts))]


@pytest.mark.parametrize("policy", POLICIES)
def test_outputs_equal_the_synchronous_engine(model, workload, policy):
  prompts, params, add_at = workload
  runs = {}
  for async_decode, steps in ((False, 1), (True, 1), (True, 3)):
    engine = pdopt.Engine(model, pdopt.EngineConfig(policy=policy, num_pages=40, async_decode=async_decode,
                                                    num_scheduler_steps=steps, **SMALL))
    chained = _record_chains(engine)
    runs[async_decode, steps] = (_serve(engine, prompts, params, add_at),
                                 [c.num_steps for c in chained if c is not None])
  sync, _ = runs[False, 1]
  for steps in (1, 3):
    overlapped, chained_steps = runs[True, steps]
    assert len(chained_steps) > (20 if steps == 1 else 8)  # Steady decoding was overlapped.
    assert chained_steps.count(steps) > 5  # ... in blocks of `steps` where the limits allowed.
    _check_same_outputs(sync, overlapped, steps)


def _record_chains(engine) -> list:
  """Every chaining attempt of `engine` from now on: the chained plan, or None where it declined."""
  chained = []
  chain = engine._chain  # pylint: disable=protected-access
  engine._chain = lambda now: chained.append(chain(now)) or chained[-1]  # pylint: disable=protected-access
  return chained


def _check_same_outputs(sync, overlapped, steps):
  for i, (a, b) in enumerate(zip(sync, overlapped)):
    if i == 9:  # Aborted mid-decode: the overlapped engine may not have read the in-flight token yet.
      assert a.finish_reason == b.finish_reason == "abort"
      if steps == 1:
        assert a.num_generated - 1 <= b.num_generated <= a.num_generated > 1
      else:  # Blocks advance several tokens per step(), so the abort lands at another token.
        assert min(a.num_generated, b.num_generated) > 1
      n = min(a.num_generated, b.num_generated)
      assert b.output_token_ids[:n] == a.output_token_ids[:n]
      continue
    assert (b.output_token_ids, b.finish_reason, b.status) == (a.output_token_ids, a.finish_reason, a.status)


@pytest.mark.parametrize("decode_variant,steps", [(False, 1), (True, 1), (False, 3)],
                         ids=["one_variant", "decode_variant", "multi_step"])
def test_no_compilation_after_warmup(model, workload, decode_variant, steps):
  prompts, params, add_at = workload
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=40, async_decode=True, num_scheduler_steps=steps,
                                                  **SMALL))
  engine.executor.runner.decode_variant = decode_variant  # As on GPU (the reference ignores the flag).
  engine.warmup()
  compiled = engine.num_compilations
  _serve(engine, prompts, params, add_at)
  assert engine.num_compilations == compiled


@pytest.mark.parametrize("steps", [1, 4])
def test_generate_and_tight_pool(model, workload, steps):
  # 12 pages cannot hold every request: preemptions interleave with overlapped steps.
  prompts, params, _ = workload
  expected = pdopt.Engine(model, pdopt.EngineConfig(num_pages=12, **SMALL)).generate(prompts, params)
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=12, async_decode=True, num_scheduler_steps=steps,
                                                  **SMALL))
  got = engine.generate(prompts, params)
  assert [o.token_ids for o in got] == [o.token_ids for o in expected]
  assert engine.num_preemptions > 0
  engine.check_no_leaks()


def test_scheduler_steps_need_async_decode(model):
  with pytest.raises(ValueError, match="num_scheduler_steps=4"):
    pdopt.Engine(model, pdopt.EngineConfig(num_scheduler_steps=4))
  with pytest.raises(ValueError, match="num_scheduler_steps=0"):
    pdopt.Engine(model, pdopt.EngineConfig(num_scheduler_steps=0, async_decode=True))


def test_refused_with_speculation_or_handoff(model):
  with pytest.raises(ValueError, match="async_decode"):
    pdopt.Engine(model, pdopt.EngineConfig(async_decode=True, handoff_after_prefill=True))
  with pytest.raises(ValueError, match="async_decode"):
    pdopt.Engine(model, pdopt.EngineConfig(async_decode=True, speculative=SpeculativeConfig(method="ngram")))


def test_tokens_after_a_stop_mid_block_do_not_enter_the_prefix_cache(model):
  # A block of 8 decode steps computes past a stop token; those tokens and their K/V are dropped, so a later
  # request continuing past the stop finds in the prefix cache exactly what the synchronous engine cached.
  cfg = dict(page_size=4, num_pages=40, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=160,
             token_buckets=(16, 64), seq_buckets=(4, 8), page_buckets=(40,))
  prompt = list(range(7, 17))
  full = pdopt.Engine(model, pdopt.EngineConfig(**cfg)).generate(
      [prompt], pdopt.SamplingParams(max_tokens=30, ignore_eos=True))[0].token_ids
  stop = next(i for i in range(2, 6) if full[i] not in full[:i])  # Inside the first block of 8.
  params = pdopt.SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=(full[stop],))
  cached = {}
  for async_decode, steps in ((False, 1), (True, 8)):
    engine = pdopt.Engine(model, pdopt.EngineConfig(async_decode=async_decode, num_scheduler_steps=steps, **cfg))
    out = engine.generate([prompt], params)[0]
    assert out.token_ids == full[:stop + 1] and out.finish_reason == "stop"
    follow = engine.add_request(prompt + full[:20], pdopt.SamplingParams(max_tokens=1))
    while engine.has_unfinished():
      engine.step()
    engine.check_no_leaks()
    cached[steps] = engine.requests[follow].num_cached_tokens
  assert cached[8] == cached[1]


def test_a_pool_too_full_for_a_block_still_chains_single_steps(model):
  # Pages for one more token each fit, pages for a block of 4 do not: steps stay overlapped, one at a time.
  cfg = dict(page_size=4, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=160, token_buckets=(16, 64),
             seq_buckets=(4, 8), page_buckets=(40,), enable_prefix_caching=False)
  prompts = [list(range(3 + i, 13 + i)) for i in range(4)]  # 10 tokens: 3 pages each, room for 2 more tokens.
  params = pdopt.SamplingParams(max_tokens=8, ignore_eos=True)
  expected = pdopt.Engine(model, pdopt.EngineConfig(num_pages=64, **cfg)).generate(prompts, params)
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=12, async_decode=True, num_scheduler_steps=4, **cfg))
  chained = _record_chains(engine)
  got = engine.generate(prompts, params)
  assert [o.token_ids for o in got] == [o.token_ids for o in expected]
  # The first chain: a block of 4 needs a 4th page per request (none free), one more step does not.
  assert chained[0] is not None and chained[0].num_steps == 1
  engine.check_no_leaks()


def test_blocks_of_steps_on_a_quantized_cache(model, workload):
  # Each step of a block writes its K/V quantized, as the synchronous engine does.
  prompts, params, _ = workload
  config = dict(num_pages=40, kv_cache_dtype="int8", **SMALL)
  expected = pdopt.Engine(model, pdopt.EngineConfig(**config)).generate(prompts[:6], params[:6])
  engine = pdopt.Engine(model, pdopt.EngineConfig(async_decode=True, num_scheduler_steps=3, **config))
  chained = _record_chains(engine)
  got = engine.generate(prompts[:6], params[:6])
  assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in expected]
  assert sum(c is not None and c.num_steps == 3 for c in chained) > 3
  engine.check_no_leaks()
