"""Decode speed against the number of speculative tokens k, at batch 1, on held-out code prompts.

`heldout_prompts` cuts prompts from the files the shipped tiny-code models never trained on (the `eval_files`
of their manifest, read from this interpreter's standard library). `run` serves the prompts one at a time
(batch 1, greedy, `ignore_eos` so every k generates the same number of tokens) on a fresh engine per k
(k = 0: no speculation) after a warm-up, and reports decode tokens/s (tokens after the first, over the time
from the first token to the last, so prefill is excluded) with the speculation counters. Greedy outputs must
not depend on k; each row says whether they matched k = 0. With a temperature, request i samples with seed i.

The shipped tiny-code pair is small and briefly trained: greedy continuations of many prompts soon settle
into runs of spaces or underscores that both models predict, which inflates greedy acceptance; sampled
decoding (`temperature=1`) shows the acceptance of the models' actual distributions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from pdopt.engine.config import EngineConfig
from pdopt.engine.engine import Engine
from pdopt.engine.request import SamplingParams
from pdopt.engine.speculative import SpeculativeConfig
from pdopt.models import pretrained
from pdopt.models.transformer import Transformer
from pdopt.training import data


@dataclasses.dataclass(frozen=True)
class SpecBenchRow:
  """One k of the benchmark.

  Attributes:
    method: "none", "draft" or "ngram".
    k: guesses per step (0: no speculation).
    num_prompts: prompts served, one at a time.
    decode_tokens: generated tokens after each request's first one, summed.
    decode_s: seconds from each request's first token to its last, summed.
    decode_tokens_per_s: decode_tokens / decode_s.
    speedup: decode_tokens_per_s over that of k = 0 (1.0 for k = 0).
    acceptance_rate, mean_accepted_length, tokens_per_forward: `SpecStats` (0 without speculation; the
      forward count includes each request's prefill pass).
    identical_to_k0: greedy outputs equal those of k = 0.
    propose_ms, target_ms: host wall time per target pass spent proposing (for the draft model only
      dispatching its program) and in the target pass, whose wait includes the draft's device time (0
      without speculation).
  """
  method: str
  k: int
  num_prompts: int
  decode_tokens: int
  decode_s: float
  decode_tokens_per_s: float
  speedup: float
  acceptance_rate: float
  mean_accepted_length: float
  tokens_per_forward: float
  identical_to_k0: bool
  propose_ms: float = 0.0
  target_ms: float = 0.0


def heldout_prompts(num_prompts: int, prompt_len: int, model: str = "tiny-code") -> list[list[int]]:
  """Byte-token prompts of `prompt_len` tokens from the held-out files of a shipped model, one per file,
  starting at the first line break after a third of the file (code rather than license headers).

  Raises:
    ValueError: fewer held-out files of at least 2 * prompt_len bytes than `num_prompts` on this machine.
  """
  root = data.stdlib_root()
  tok = pretrained.tokenizer(model)
  prompts = []
  for rel in pretrained.manifest(model)["corpus"]["eval_files"]:
    path = root / rel
    if not path.is_file():
      continue
    raw = path.read_bytes()
    start = raw.find(b"\n", len(raw) // 3) + 1
    if start <= 0 or len(raw) - start < 2 * prompt_len:
      continue
    prompts.append(tok.encode(raw[start:start + prompt_len]))
    if len(prompts) == num_prompts:
      return prompts
  raise ValueError(f"only {len(prompts)} held-out files of {model!r} under {root} hold a {prompt_len}-token "
                   f"prompt; asked for {num_prompts}")


def run(target: Transformer, prompts: Sequence[Sequence[int]], ks: Sequence[int] = (0, 1, 2, 4, 8), *,
        method: str = "draft", draft: Transformer | None = None, max_tokens: int = 128,
        temperature: float = 0.0, page_size: int = 16) -> list[SpecBenchRow]:
  """Serves `prompts` at batch 1 for every k and measures decode speed.

  Args:
    target: the target model.
    prompts: token-id prompts.
    ks: speculative tokens per step; 0 runs without speculation (the baseline, run first whether listed or not).
    method: "draft" (needs `draft`) or "ngram".
    draft: the draft model.
    max_tokens: tokens generated per prompt.
    temperature: 0 is greedy; otherwise request i samples with seed i (outputs then differ between k, by
      design, and `identical_to_k0` is False).
    page_size: KV page size (tokens).

  Returns:
    One row per k of `ks`, in order.
  """
  max_prompt = max(len(p) for p in prompts)
  max_model_len = max_prompt + max_tokens
  budget = max(max_prompt, max(ks) + 1)
  base = dict(page_size=page_size, num_pages=math.ceil(max_model_len / page_size) + 1, max_num_seqs=1,
              max_num_batched_tokens=budget, max_model_len=max_model_len,
              token_buckets=tuple(sorted({16, budget})), seq_buckets=(1,),
              page_buckets=(math.ceil(max_model_len / page_size),))
  params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i, ignore_eos=True)
            for i in range(len(prompts))]
  rows, reference, baseline = [], None, None
  for k in [0] + [k for k in ks if k != 0]:
    spec = SpeculativeConfig(method=method, num_speculative_tokens=k) if k else None
    engine = Engine(target, EngineConfig(speculative=spec, **base), draft_model=draft if k and method == "draft"
                    else None)
    engine.warmup()
    engine.generate([prompts[0]], params[:1])  # Warms the host-side paths too.
    warm = engine.executor.spec_stats if k else None
    outputs, tokens, seconds = [], 0, 0.0
    for prompt, sp in zip(prompts, params):
      rid = engine.add_request(prompt, sp)
      while engine.has_unfinished():
        engine.step()
      req = engine.requests[rid]
      outputs.append(req.output_token_ids)
      tokens += req.num_generated - 1
      seconds += req.finish_time - req.first_token_time
    engine.check_no_leaks()
    stats = _since(engine.executor.spec_stats if k else None, warm)
    rate = tokens / seconds
    if k == 0:
      reference, baseline = outputs, rate
    if k in ks:
      rows.append(SpecBenchRow(
          method=method if k else "none", k=k, num_prompts=len(prompts), decode_tokens=tokens, decode_s=seconds,
          decode_tokens_per_s=rate, speedup=rate / baseline, acceptance_rate=stats.get("acceptance_rate", 0.0),
          mean_accepted_length=stats.get("mean_accepted_length", 0.0),
          tokens_per_forward=stats.get("tokens_per_forward", 0.0), identical_to_k0=outputs == reference,
          propose_ms=stats.get("propose_ms", 0.0), target_ms=stats.get("target_ms", 0.0)))
  return rows


def _since(now, before) -> dict[str, float]:
  """The derived speculation rates of the counters accumulated between two `SpecStats` (None: none)."""
  if now is None:
    return {}
  delta = dataclasses.replace(now, **{f.name: getattr(now, f.name) - getattr(before, f.name)
                                      for f in dataclasses.fields(now)})
  per_pass = 1e3 / max(delta.num_forwards, 1)
  return dict(acceptance_rate=delta.acceptance_rate, mean_accepted_length=delta.mean_accepted_length,
              tokens_per_forward=delta.tokens_per_forward, propose_ms=delta.propose_seconds * per_pass,
              target_ms=delta.target_seconds * per_pass)


def format_table(rows: Sequence[SpecBenchRow]) -> str:
  """A Markdown table of the rows."""
  lines = ["| method | k | decode tok/s | speed-up | mean accepted length | acceptance rate | tokens/forward "
           "| propose ms/pass | target ms/pass | greedy = k0 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(f"| {r.method} | {r.k} | {r.decode_tokens_per_s:.1f} | {r.speedup:.2f}x | "
                 f"{r.mean_accepted_length:.2f} | {r.acceptance_rate:.2f} | {r.tokens_per_forward:.2f} | "
                 f"{r.propose_ms:.2f} | {r.target_ms:.2f} | {'yes' if r.identical_to_k0 else 'NO'} |")
  return "\n".join(lines)
