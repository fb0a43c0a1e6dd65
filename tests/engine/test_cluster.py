"""Disaggregated prefill/decode and colocated replicas on 4 virtual CPU devices.

The device count must be set before JAX starts, so the checks run in a child process of their own.
"""

import textwrap

import pytest

from pdopt.benchmark.deployments import parse_deployments

_CHILD = textwrap.dedent("""
    import os, json, tempfile
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np, pdopt
    from pdopt import benchmark
    from pdopt.engine.cluster import Cluster, ClusterConfig
    assert len(jax.devices()) == 4
    model = pdopt.init_model(pdopt.preset("tiny"), seed=0)
    rng = np.random.default_rng(0)
    prefix = list(rng.integers(2, 512, size=48))
    prompts = [list(rng.integers(2, 512, size=int(rng.integers(1, 90)))) for _ in range(8)]
    prompts += [prefix + list(rng.integers(2, 512, size=int(rng.integers(1, 20)))) for _ in range(4)]
    params = [pdopt.SamplingParams(max_tokens=int(m), ignore_eos=True) for m in rng.integers(1, 7, size=12)]
    ecfg = pdopt.EngineConfig(num_pages=48, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256,
                              token_buckets=(16, 64), seq_buckets=(8,), page_buckets=(16,))
    expected = [o.token_ids for o in pdopt.Engine(model, ecfg).generate(prompts, params)]
    for mode, p, d, n in [("disaggregated", 1, 1, 2), ("disaggregated", 1, 3, 4), ("disaggregated", 2, 2, 4),
                          ("colocated", 0, 2, 2)]:
      with Cluster(model, ClusterConfig(mode=mode, num_prefill=p, num_decode=d, engine=ecfg),
                   jax.devices()[:n]) as cluster:
        ids = []
        for prompt, sp in zip(prompts, params):
          ids.append(cluster.add_request(prompt, sp))
          if len(ids) == 8:  # The shared-prefix prompts arrive after the first ones have been prefilled.
            cluster.wait(timeout=300)
        cluster.wait(timeout=300)
        outputs = cluster.outputs()
        assert [outputs[i] for i in ids] == expected, (mode, p, d)
        records = cluster.records()
        assert len(records) == len(prompts) and all(r.status == "finished" for r in records)
        cluster.check_no_leaks()
        if mode == "disaggregated":
          handed = sum(sp.max_tokens > 1 for sp in params)
          assert len(cluster.transfer_times) == handed, (len(cluster.transfer_times), handed)
          hits = sum(i.engine.block_manager.stats().prefix_hits for i in cluster.prefill)
          assert hits >= (4 - p) * 48, hits  # Each prefill instance misses the prefix once.
          for r in records:  # The copy shows in the gap after the first token, never before it.
            assert r.first_token_time == r.token_times[0] <= r.finish_time
      print("ok", mode, p, d)

    out_dir = tempfile.mkdtemp()
    result = benchmark.run_experiment({
        "run_name": "disagg", "results_dir": out_dir, "policies": "chunked", "progress": False,
        "deployments": "disaggregated:1:1,colocated:2", "devices": 2, "rate": 20.0, "warmup": False,
        "workload": {"kind": "synthetic", "num_requests": 6, "prompt_len": 40, "output_len": 4, "low_token_id": 2},
        "engine": {"num_pages": 48, "max_num_batched_tokens": 64, "max_num_seqs": 8, "max_model_len": 256,
                   "token_buckets": (16, 64), "seq_buckets": (8,), "page_buckets": (16,)},
    }, print_fn=None)
    metrics = json.load(open(os.path.join(out_dir, "disagg", "metrics.json")))
    assert set(metrics) == {"chunked", "disagg-1P1D-chunked", "colocated-2x-chunked"}, set(metrics)
    assert metrics["disagg-1P1D-chunked"]["completed"] == 6 and metrics["disagg-1P1D-chunked"]["num_transfers"] == 6
    assert metrics["colocated-2x-chunked"]["completed"] == 6
    print("ok runner")
""")


def test_disaggregated_and_colocated_match_one_engine(run_child):
  assert run_child(_CHILD, timeout=900).count("ok") == 5


@pytest.mark.parametrize("spec,match", [("split:1:1", "unknown mode"), ("disaggregated:1", "should be"),
                                        ("colocated:0", ">= 1"), ("colocated:2:fastest", "unknown policy"),
                                        ("disaggregated:a:1", "integers")])
def test_bad_deployment_is_named(spec, match):
  with pytest.raises(ValueError, match=match):
    parse_deployments(spec)


def test_deployment_labels():
  assert [d.label for d in parse_deployments("disaggregated:1:3, colocated:2:prefill_first")] == [
      "disagg-1P3D-chunked", "colocated-2x-prefill_first"]


@pytest.mark.parametrize("fields,match", [
    (dict(mode="pipelined"), "ClusterConfig.mode='pipelined'; valid: colocated, disaggregated"),
    (dict(num_decode=0), "ClusterConfig.num_decode=0"),
    (dict(num_prefill=0), "ClusterConfig.num_prefill=0"),
    (dict(num_prefill=1.5), "ClusterConfig.num_prefill=1.5"),
    (dict(engine="chunked"), "ClusterConfig.engine='chunked'; valid: an EngineConfig"),
])
def test_cluster_config_errors_name_the_field(fields, match):
  from pdopt.engine.cluster import ClusterConfig  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=match):
    ClusterConfig(**fields)
