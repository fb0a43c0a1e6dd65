"""The engine benchmark's arithmetic and its decode part, on CPU with the tiny preset."""

from __future__ import annotations

import dataclasses

import pytest

import pdopt
from pdopt.benchmark import engine_speed as bench


def test_forward_flops_counts_projections_attention_and_last_logits():
  c = pdopt.preset("tiny")
  e, h, k, d, f, v, n = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
                         c.vocab_size, c.num_layers)
  per_token = n * 2 * (e * h * d + 2 * e * k * d + h * d * e + 3 * e * f)
  want = per_token * (10 + 6) + n * 2 * h * d * (10 ** 2 + 6 ** 2) + 2 * 2 * e * v
  assert bench.forward_flops(c, [10, 6]) == want


@pytest.mark.parametrize("async_decode", [False, True])
def test_decode_part_reports_floor_device_and_host_time(async_decode):
  model = pdopt.init_model(pdopt.preset("tiny", dtype="bfloat16"), seed=0)
  settings = dataclasses.replace(bench.quick(bench.Settings()), decode_batches=(2,), context=40, decode_steps=2,
                                 async_decode=async_decode)
  rows = bench.bench_decode(model, settings, copy_tbps=0.05)
  (row,) = rows
  assert row["batch"] == 2 and row["context"] >= 40
  assert row["kv_gb"] == 2 * row["context"] * bench.kv_bytes_per_token(model.config) / 1e9
  for key in ("floor_ms", "device_ms", "engine_step_ms", "put_ms", "launch_ms"):
    assert row[key] > 0, key
  assert abs(row["host_overhead_ms"] - (row["engine_step_ms"] - row["device_ms"])) < 1e-9


def test_quick_keeps_the_decode_batches_asked_for():
  assert bench.quick(bench.Settings()).decode_batches == bench.QUICK_DECODE_BATCHES
  assert bench.quick(bench.Settings(decode_batches=(2, 8))).decode_batches == (2, 8)
  assert len(set(bench.QUICK_DECODE_BATCHES)) == len(bench.QUICK_DECODE_BATCHES)
