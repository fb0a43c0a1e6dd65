# JAX_PLATFORMS=cpu python experiments/probes/sim_step_costs.py
"""Host time per step of the simulated engine (Llama-3.2-1B shape, `chunked`, the shipped H100 cost file), by
what the step holds: decode-only steps (unchained) of R sequences; steps that each admit, run and end one
prompt of P tokens beside R decoding sequences; and such steps with a short or a long queue of prompts. The
numbers behind docs/design/steady_decodes.md ("What a step costs now"); wall time, so run it on a quiet
machine."""
import time

import pdopt
from pdopt import sim
from pdopt.models.config import preset
from pdopt.scheduling.step_cost import StepCostModel
from pdopt.workloads import TokenIds

COST = StepCostModel.load("pdopt/step_costs/llama-3.2-1b_h100.json")
MODEL = preset("llama-3.2-1b")
CONFIG = pdopt.EngineConfig(policy="chunked", num_pages=40000, max_num_seqs=256, max_num_batched_tokens=1024)


def engine(num_decoding: int, chain: bool) -> tuple[pdopt.Engine, sim.VirtualClock]:
  """An engine with `num_decoding` sequences past their prompts, decoding."""
  clock = sim.VirtualClock()
  eng = sim.simulated_engine(MODEL, CONFIG, COST, clock, chain=chain)
  for _ in range(num_decoding):
    eng.add_request(list(range(1, 65)), pdopt.SamplingParams(max_tokens=4000, ignore_eos=True), arrival_time=0.0)
  for _ in range(5):
    eng.advance()
  return eng, clock


def decode_only(num_decoding: int, num_steps: int = 400) -> float:
  eng, _ = engine(num_decoding, chain=False)
  start = time.perf_counter()
  for _ in range(num_steps):
    eng.advance()
  return (time.perf_counter() - start) / num_steps


def with_prompts(num_decoding: int, prompt_len: int, num_steps: int = 2000) -> float:
  eng, clock = engine(num_decoding, chain=True)
  vocab = MODEL.vocab_size
  prompts = [TokenIds([7 + i % 1000] * prompt_len, vocab) for i in range(num_steps)]  # A different prefix each.
  one = pdopt.SamplingParams(max_tokens=1, ignore_eos=True)
  steps0, start = eng.num_steps, time.perf_counter()
  for prompt in prompts:
    eng.add_request(prompt, one, arrival_time=clock.now)
    eng.advance()
  seconds = time.perf_counter() - start
  if eng.waiting or eng.num_steps - steps0 != num_steps:
    raise AssertionError("a step did not admit, run and end its prompt")
  return seconds / num_steps


def queued(num_waiting: int, num_steps: int = 300) -> float:
  """Steps of one 704-token prompt each (the policy's budget), with `num_waiting` such prompts queued at once."""
  eng, clock = engine(1, chain=True)
  one = pdopt.SamplingParams(max_tokens=1, ignore_eos=True)
  for i in range(num_waiting):
    eng.add_request(TokenIds([7 + i % 1000] * 704, MODEL.vocab_size), one, arrival_time=clock.now)
  start = time.perf_counter()
  for _ in range(num_steps):
    eng.advance()
  return (time.perf_counter() - start) / num_steps


for r in (1, 32, 128):
  print(f"decode-only, {r:3d} sequences: {1e6 * decode_only(r):6.1f} us/step")
for r, p in ((1, 96), (1, 704), (32, 704), (128, 704)):
  print(f"one prompt of {p} tokens + {r:3d} decoding: {1e6 * with_prompts(r, p):6.1f} us/step")
for w in (400, 3000):
  print(f"one prompt of 704 tokens a step, {w:4d} queued: {1e6 * queued(w):6.1f} us/step")
