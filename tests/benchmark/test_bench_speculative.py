"""The speculative decoding benchmark on CPU, at a tiny size: rows, greedy identity and timing split."""

from pdopt.benchmark import speculation_speed
from pdopt.models import pretrained


def test_run_reports_identity_acceptance_and_host_split():
  target = pretrained.load_pretrained("tiny-code")
  draft = pretrained.load_pretrained("tiny-code-draft")
  prompts = speculation_speed.heldout_prompts(2, 32)
  rows = speculation_speed.run(target, prompts, ks=(0, 3), draft=draft, max_tokens=12)
  assert [(r.method, r.k) for r in rows] == [("none", 0), ("draft", 3)]
  base, spec = rows
  assert base.identical_to_k0 and spec.identical_to_k0
  assert base.decode_tokens == spec.decode_tokens == 2 * 11
  assert 1.0 <= spec.mean_accepted_length <= 4.0 and 0.0 <= spec.acceptance_rate <= 1.0
  assert spec.propose_ms > 0 and spec.target_ms > 0 and base.propose_ms == 0
  table = speculation_speed.format_table(rows)
  assert table.count("\n") == 3 and "| draft | 3 |" in table
