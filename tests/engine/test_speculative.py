"""Speculative decoding: greedy identity under every policy, the target's sampling distribution (chi-square),
page accounting after rollbacks, config validation and the n-gram lookup."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import pdopt
from pdopt.engine import sampler
from pdopt.engine.request import RequestStatus
from pdopt.engine.speculative import NgramProposer, SpeculativeConfig, SpeculativeMethod

VOCAB = 512
POLICIES = ("chunked", "prefill_first", "decode_first", "slo_aware")
# Few, coarse buckets: every engine of this module compiles the same handful of shapes.
SMALL = dict(page_size=16, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=128, token_buckets=(64,),
             seq_buckets=(8,), page_buckets=(8,))


def _perturbed(model, sigma, seed):
  """A copy of `model` with Gaussian noise (sigma times each weight matrix's std) on its matrices: a draft
  that agrees with the target part of the time."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [x + sigma * x.std() * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 else x
            for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


@pytest.fixture(scope="module")
def target():
  return pdopt.init_model(pdopt.preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def drafts(target):
  small = pdopt.preset("tiny", hidden_size=64, intermediate_size=128, num_layers=1, head_dim=16)
  return {"draft": _perturbed(target, 0.1, seed=1),  # Accepts about half of its guesses.
          "small-draft": pdopt.init_model(small, seed=1)}  # A different random model: rejects nearly all.


@pytest.fixture(scope="module")
def workload(target):
  """Random and repetitive prompts (n-gram hits), staggered arrivals, lengths that end mid-speculation, and
  stop tokens taken from the middle of the reference outputs; with the expected greedy outputs."""
  rng = np.random.default_rng(11)
  prompts = [list(rng.integers(2, VOCAB, size=int(rng.integers(1, 80)))) for _ in range(6)]
  prompts += [[5, 6, 7, 8] * 9, [9, 10] * 15 + [11], list(rng.integers(2, 40, size=60))]
  max_tokens = [int(m) for m in rng.integers(1, 15, size=len(prompts))]
  engine = pdopt.Engine(target, pdopt.EngineConfig(num_pages=64, **SMALL))
  reference = [o.token_ids for o in engine.generate(
      prompts, [pdopt.SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])]
  params, expected = [], []
  for i, (ref, m) in enumerate(zip(reference, max_tokens)):
    stop = (ref[len(ref) // 2],) if i % 2 and len(ref) > 2 else ()
    params.append(pdopt.SamplingParams(max_tokens=m, ignore_eos=True, stop_token_ids=stop))
    expected.append(ref[:ref.index(stop[0]) + 1] if stop else ref)
  add_at = [int(a) for a in rng.integers(0, 6, size=len(prompts))]
  return prompts, params, add_at, expected


def _run(engine, prompts, params, add_at):
  ids, step = {}, 0
  while len(ids) < len(prompts) or engine.has_unfinished():
    for i, at in enumerate(add_at):
      if at <= step and i not in ids:
        ids[i] = engine.add_request(prompts[i], params[i])
    engine.step()
    engine.check_no_leaks()  # Allocator and draft-cache invariants after every step, rollbacks included.
    step += 1
    assert step < 2000, "engine made no progress"
  return [engine.requests[ids[i]] for i in range(len(prompts))]


@pytest.mark.parametrize("method", ["ngram", "draft", "small-draft"])
@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_identity_under_every_policy(target, drafts, workload, policy, method):
  prompts, params, add_at, expected = workload
  spec = SpeculativeConfig(method="ngram" if method == "ngram" else "draft", num_speculative_tokens=3)
  # 24 pages of 16 tokens cannot hold every running request: forces preemption (and a full draft pool).
  engine = pdopt.Engine(target, pdopt.EngineConfig(policy=policy, num_pages=24, speculative=spec, **SMALL),
                        draft_model=drafts.get(method))
  requests = _run(engine, prompts, params, add_at)
  for i, req in enumerate(requests):
    assert req.status is RequestStatus.FINISHED
    assert req.output_token_ids == expected[i], f"prompt {i} (len {len(prompts[i])})"
    assert req.finish_reason == ("stop" if params[i].stop_token_ids else "length")
  stats_ = engine.executor.spec_stats
  assert stats_.num_draft_tokens > 0
  if method != "small-draft":
    assert 0 < stats_.acceptance_rate < 1
  assert stats_.tokens_per_forward > 1
  engine.check_no_leaks()


def test_draft_equal_to_target_accepts_everything(target):
  engine = pdopt.Engine(target, pdopt.EngineConfig(
      num_pages=64, speculative=SpeculativeConfig(method="draft", num_speculative_tokens=4), **SMALL),
      draft_model=target)
  rng = np.random.default_rng(2)
  prompts = [list(rng.integers(2, VOCAB, size=20)) for _ in range(3)]
  engine.generate(prompts, pdopt.SamplingParams(max_tokens=11, ignore_eos=True))
  s = engine.executor.spec_stats
  assert s.acceptance_rate == 1.0
  assert s.num_drafts == 6 and s.mean_accepted_length == 5.0  # Tokens 2-6 and 7-11 of each request.
  assert s.num_forwards == 3 and s.tokens_per_forward == 11.0  # One prefill and two verifications.
  engine.check_no_leaks()


def test_abort_and_preemption_leak_nothing(target, drafts):
  engine = pdopt.Engine(target, pdopt.EngineConfig(
      num_pages=12, speculative=SpeculativeConfig(method="draft", num_speculative_tokens=3), **SMALL),
      draft_model=drafts["draft"])
  rng = np.random.default_rng(4)
  ids = [engine.add_request(list(rng.integers(2, VOCAB, size=int(rng.integers(20, 60)))),
                            pdopt.SamplingParams(max_tokens=40, ignore_eos=True)) for _ in range(6)]
  for step in range(40):
    engine.step()
    engine.check_no_leaks()
    if step in (8, 15):
      engine.abort(ids[step % 6])
  while engine.has_unfinished():
    engine.step()
  assert engine.num_preemptions > 0
  assert engine.executor.spec_stats.num_draft_tokens > 0
  engine.check_no_leaks()
  assert not engine.executor.proposer.computed


# ----------------------------------------------------------------------------- sampled distribution

SMALL_VOCAB = 16
PROMPT = [3, 4, 5, 10, 10, 10, 6, 7, 3, 4]  # Ends as it starts: the n-gram proposer guesses likely tokens.
NUM_SAMPLES = 2000


@pytest.fixture(scope="module")
def peaked_pair():
  """A 16-token target with a sharpened head (top probability ~0.3, far from uniform) and a perturbed draft
  whose proposals are often wrong (total variation ~0.5 from the target)."""
  config = pdopt.preset("tiny", vocab_size=SMALL_VOCAB, hidden_size=64, intermediate_size=128, num_layers=1,
                        head_dim=16, max_position_embeddings=128, eos_token_id=())
  target = pdopt.init_model(config, seed=0)
  target.lm_head[...] = target.lm_head[...] * 10.0
  return target, _perturbed(target, 0.6, seed=1)


def _filtered_probs(logits, params):
  """The target's exact sampling distribution (temperature, top-k, top-p) for rows of logits."""
  n = logits.shape[0]
  masked = sampler.filter_logits(jax.numpy.asarray(logits), jax.numpy.full(n, params.temperature),
                                 jax.numpy.full(n, params.top_k, jax.numpy.int32),
                                 jax.numpy.full(n, params.top_p))
  return np.asarray(jax.nn.softmax(masked, axis=-1), np.float64)


def _exact_marginals(model, params):
  """P(token 1) and P(token 2) of the output (token 0 is sampled by the prefill, tokens 1 and 2 by
  verification), summed exactly over the earlier tokens."""
  p0 = _filtered_probs(pdopt.logits(model, PROMPT)[-1:], params)[0]
  p1 = _filtered_probs(np.stack([pdopt.logits(model, PROMPT + [a])[-1] for a in range(SMALL_VOCAB)]), params)
  p2 = np.zeros(SMALL_VOCAB)
  for a in range(SMALL_VOCAB):
    rows = np.stack([pdopt.logits(model, PROMPT + [a, b])[-1] for b in range(SMALL_VOCAB)])
    p2 += p0[a] * (p1[a][:, None] * _filtered_probs(rows, params)).sum(axis=0)
  return p0 @ p1, p2


def _chi_square_p(counts, probs):
  """Pearson's test, with cells expected fewer than 5 times pooled."""
  expected = probs * counts.sum()
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  assert obs[~keep].sum() == 0, "sampled a token the target gives probability 0"
  return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.mark.parametrize("method,params", [
    ("draft", pdopt.SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True)),
    ("ngram", pdopt.SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True)),
    ("draft", pdopt.SamplingParams(max_tokens=3, temperature=0.8, top_k=6, top_p=0.9, ignore_eos=True)),
], ids=["draft", "ngram", "draft-top-k-top-p"])
def test_sampled_distribution_equals_the_targets(peaked_pair, method, params):
  target, draft = peaked_pair
  engine = pdopt.Engine(target, pdopt.EngineConfig(
      num_pages=256, page_size=16, max_num_batched_tokens=512, max_num_seqs=128, max_model_len=32,
      token_buckets=(512,), seq_buckets=(128,), page_buckets=(2,),
      speculative=SpeculativeConfig(method=method, num_speculative_tokens=2)),
      draft_model=draft if method == "draft" else None)
  outs = engine.generate([PROMPT] * NUM_SAMPLES,
                         [dataclasses.replace(params, seed=i) for i in range(NUM_SAMPLES)])
  engine.check_no_leaks()
  s = engine.executor.spec_stats
  assert 0.1 < s.acceptance_rate < 0.9 and s.num_accepted_tokens > 100  # Both branches ran many times.
  tokens = np.asarray([o.token_ids for o in outs])
  p1, p2 = _exact_marginals(target, params)
  for position, probs in ((1, p1), (2, p2)):
    counts = np.bincount(tokens[:, position], minlength=SMALL_VOCAB)
    assert _chi_square_p(counts, probs) > 1e-3, (position, counts, np.round(probs * NUM_SAMPLES))


# ----------------------------------------------------------------------------------- units and config


def test_ngram_lookup_proposes_what_followed_the_latest_match():
  ngram = NgramProposer(min_n=1, max_n=3)
  assert ngram.lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]  # The latest match of [1, 2, 3].
  assert ngram.lookup([4, 5, 6, 4, 5], 4) == [6, 4, 5]  # Fewer than k: the sequence ends.
  assert ngram.lookup([1, 2, 3, 4], 3) == []  # No earlier occurrence of any suffix.
  assert ngram.lookup([7], 3) == []
  assert NgramProposer(2, 2).lookup([8, 1, 5, 2, 5], 2) == []  # [2, 5] never occurred; 1-grams not tried.


def test_config_errors_name_the_field(target, drafts):
  with pytest.raises(ValueError, match="unknown method 'medusa'; valid: draft, ngram"):
    SpeculativeConfig(method="medusa")
  with pytest.raises(ValueError, match="num_speculative_tokens"):
    SpeculativeConfig(num_speculative_tokens=0)
  with pytest.raises(ValueError, match="prompt_lookup_min"):
    SpeculativeConfig(method="ngram", prompt_lookup_min=3, prompt_lookup_max=2)
  assert SpeculativeConfig(method="ngram").method is SpeculativeMethod.NGRAM
  draft_config = pdopt.EngineConfig(speculative=SpeculativeConfig(method="draft"), **SMALL)
  with pytest.raises(ValueError, match="needs a draft model"):
    pdopt.Engine(target, draft_config)
  with pytest.raises(ValueError, match="vocab_size"):
    pdopt.Engine(target, draft_config, draft_model=pdopt.init_model(pdopt.preset("tiny", vocab_size=64)))
  with pytest.raises(ValueError, match="speculative is None"):
    pdopt.Engine(target, pdopt.EngineConfig(**SMALL), draft_model=drafts["draft"])


def test_draft_serving_compiles_nothing_after_warmup():
  # A model shape no other test uses, so the shared compilation caches start empty for it: a program that
  # warm-up compiled with differently placed inputs than serving passes would show up as a new entry.
  config = pdopt.preset("tiny", hidden_size=48, intermediate_size=96, num_layers=1, num_heads=2, num_kv_heads=1,
                        head_dim=24)
  target = pdopt.init_model(config, seed=3)
  draft = _perturbed(target, 0.1, seed=4)
  engine = pdopt.Engine(target, pdopt.EngineConfig(
      num_pages=32, speculative=SpeculativeConfig(method="draft", num_speculative_tokens=3), **SMALL),
      draft_model=draft)
  assert engine.warmup() > 0
  compiled = engine.num_compilations
  rng = np.random.default_rng(5)
  prompts = [list(rng.integers(2, VOCAB, size=n)) for n in (5, 40, 70)]
  params = [pdopt.SamplingParams(max_tokens=12, ignore_eos=True),
            pdopt.SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=1),
            pdopt.SamplingParams(max_tokens=12, ignore_eos=True)]
  engine.generate(prompts[:1], params[:1])  # Greedy only.
  engine.generate(prompts, params)  # Mixed: the sampled variants.
  assert engine.executor.spec_stats.num_draft_tokens > 0
  assert engine.num_compilations == compiled
  engine.check_no_leaks()


def test_experiment_runner_reports_speculation(tmp_path):
  from pdopt import benchmark  # pylint: disable=import-outside-toplevel
  config = {"run_name": "spec", "results_dir": str(tmp_path), "policies": "chunked", "progress": False,
            "rate": 100.0, "speculative_method": "ngram", "speculative_k": 3,
            "workload": {"kind": "synthetic", "num_requests": 4, "prompt_len": 24, "output_len": 8},
            "engine": dict(SMALL, num_pages=32)}
  entry = benchmark.run_experiment(config, print_fn=None)["metrics"]["chunked"]
  assert entry["completed"] == 4 and entry["num_compilations"] == 0
  for key in ("spec_acceptance_rate", "spec_mean_accepted_length", "spec_tokens_per_forward", "spec_num_drafts"):
    assert key in entry
  assert entry["spec_tokens_per_forward"] >= 1.0
  with pytest.raises(ValueError, match="speculative_draft"):
    benchmark.engine_config(benchmark.as_config({"speculative_method": "draft"}), "chunked")
  with pytest.raises(ValueError, match="unknown method 'eagle'"):
    benchmark.engine_config(benchmark.as_config({"speculative_method": "eagle"}), "chunked")
