"""Deployments of instance processes (`pdopt.deploy`): the same greedy outputs as one engine, faults that lose
no request, configurations refused before any process starts, and no process left behind."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pdopt
from pdopt import deploy
from pdopt.models.source import ModelSource

ENGINE = dict(page_size=8, num_pages=96, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256,
              token_buckets=(16, 64), seq_buckets=(8,), page_buckets=(32,))
PROMPTS = [[3 + i, 4, 5, 6, 7, 8, 9, 10 + i] * (1 + i % 5) for i in range(12)]
PARAMS = pdopt.SamplingParams(max_tokens=10, ignore_eos=True)


def _children() -> list[int]:
  """Live processes whose parent is this one, but for Python's multiprocessing resource tracker (started once
  per process by whichever test first used a process pool, here or in another test module, and alive as long as
  the process)."""
  out = []
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
      cmdline = (stat.parent / "cmdline").read_bytes()
    except OSError:
      continue
    if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"multiprocessing.resource_tracker" not in cmdline:
      out.append(int(stat.parent.name))
  return out


@pytest.fixture(scope="module")
def expected():
  model = pdopt.init_model(pdopt.preset("tiny"), seed=0)
  return [o.token_ids for o in pdopt.Engine(model, pdopt.EngineConfig(**ENGINE)).generate(PROMPTS, PARAMS)]


def _serve(d: deploy.Deployment, prompts=PROMPTS, kill_after: int | None = None) -> list[str]:
  ids = [d.add_request(p, PARAMS) for p in prompts]
  killed = False
  while d.has_unfinished():
    d.poll(0.01)
    if kill_after is not None and not killed and len(d.ended) >= kill_after:
      victim = next(i for i in d.instances if i.role != "prefill")
      os.kill(victim.process.pid, signal.SIGKILL)
      killed = True
  return ids


@pytest.mark.parametrize("mode,prefill,decode", [("disaggregated", 1, 1), ("colocated", None, 2)])
def test_outputs_equal_one_engine(expected, mode, prefill, decode):
  config = deploy.DeploymentConfig(mode=mode, num_prefill=prefill, num_decode=decode,
                                   engine=pdopt.EngineConfig(**ENGINE))
  with deploy.Deployment(config, ModelSource("tiny"), devices=[0, 1], pin_cpus=False) as d:
    ids = _serve(d)
    assert [d.outputs[i] for i in ids] == expected
    records = d.records()
    assert sorted(r.request_id for r in records) == sorted(ids)  # Each ended once.
    assert all(r.status == "finished" for r in records)
    moved = [r.kv_transfer_bytes for r in records]
    assert (min(moved) > 0) if mode == "disaggregated" else (max(moved) == 0)
    stats = d.close()
  assert not _children()
  assert sum(s["num_steps"] for s in stats.values()) > 0


def test_a_killed_instance_loses_no_request(expected):
  config = deploy.DeploymentConfig(mode="disaggregated", num_prefill=1, num_decode=2,
                                   engine=pdopt.EngineConfig(**ENGINE))
  with deploy.Deployment(config, ModelSource("tiny"), devices=[0, 1, 2], pin_cpus=False) as d:
    ids = _serve(d, PROMPTS * 2, kill_after=3)  # A decode instance dies with requests in flight.
    lost = [i.index for i in d.instances if not i.alive]
    assert len(lost) == 1
    assert sorted(r.request_id for r in d.records()) == sorted(ids)
    assert all(r.status == "finished" for r in d.records())  # Started over on the other decode instance.
    assert [d.outputs[i] for i in ids] == expected * 2
  assert not _children()


def test_failed_transfers_end_their_requests_with_the_reason():
  config = deploy.DeploymentConfig(mode="disaggregated", num_prefill=1, num_decode=1, transfer_timeout_s=1e-4,
                                   engine=pdopt.EngineConfig(**ENGINE))
  with deploy.Deployment(config, ModelSource("tiny"), devices=[0, 1], pin_cpus=False, max_attempts=2) as d:
    ids = _serve(d, PROMPTS[:4])
    records = {r.request_id: r for r in d.records()}
    assert sorted(records) == sorted(ids)
    for r in records.values():
      assert r.status == "aborted" and "KV transfer" in r.reason and "started 2 times" in r.reason
  assert not _children()


@pytest.mark.parametrize("fields,devices,match", [
    (dict(mode="colocated", num_decode=3), [0, 1], r"3 instances x 1 devices = 3 devices on host 0, but 2"),
    (dict(mode="disaggregated", num_prefill=0), [0, 1], "num_prefill=0"),
    (dict(mode="colocated", num_decode=0), [0, 1], "num_decode=0"),
    (dict(mode="colocated", num_decode=1, devices_per_instance=3), [0, 1, 2], "devices_per_instance=3 does not "
                                                                                 "divide the model's num_heads=4"),
    (dict(mode="pipelined"), [0, 1], "mode='pipelined'; valid: colocated, disaggregated"),
])
def test_deployments_that_do_not_fit_fail_before_any_process(fields, devices, match):
  with pytest.raises(ValueError, match=match):
    deploy.Deployment(deploy.DeploymentConfig(engine=pdopt.EngineConfig(**ENGINE), **fields), ModelSource("tiny"),
                      devices=devices)
  assert not _children()


# Ctrl-C as an interactive shell delivers it: a job started in the background by a non-interactive shell (a CI
# script's `cmd &`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
_RUN = textwrap.dedent("""
    import signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from experiments import run
    sys.argv = ["run", "--config=configs/disagg_cpu.py", "--config.results_dir={out}", "--config.rate=50",
                "--config.workload.num_requests=400", "--config.deployments=colocated:2"]
    run.app.run(run.main)
""")


@pytest.mark.parametrize("sig,after", [(signal.SIGINT, 15.0), (signal.SIGKILL, 15.0), (signal.SIGINT, 0.0)],
                         ids=["ctrl_c", "killed", "ctrl_c_while_starting"])
def test_ending_a_run_leaves_no_process_behind(tmp_path, sig, after):
  """Ctrl-C or SIGKILL of a run, serving or while its instances still start, leaves no process behind."""
  repo = pathlib.Path(__file__).resolve().parents[2]
  proc = subprocess.Popen([sys.executable, "-c", _RUN.format(out=tmp_path)], cwd=repo, start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    deadline = time.monotonic() + 240
    instances = []
    while time.monotonic() < deadline and len(instances) < 2:  # Until both instances are up.
      time.sleep(0.5)
      instances = [p for p in _descendants(proc.pid) if b"pdopt.deploy" in _cmdline(p)]
    assert len(instances) == 2, "the instances did not start"
    time.sleep(after)  # 15 s: compiled by now, serving; 0 s: still starting (importing, not yet connected).
    proc.send_signal(sig)
    proc.wait(60)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  time.sleep(1.0)
  assert not [p for p in instances if _alive(p)], "instance processes outlived the run"


def _descendants(pid: int) -> list[int]:
  parents = {}
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
      continue
  out, frontier = [], [pid]
  while frontier:
    p = frontier.pop()
    kids = [c for c, pp in parents.items() if pp == p]
    out += kids
    frontier += kids
  return out


def _cmdline(pid: int) -> bytes:
  try:
    return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
  except OSError:
    return b""


def _alive(pid: int) -> bool:
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"


def test_parse_deployments():
  from pdopt.benchmark.deployments import parse_deployments  # pylint: disable=import-outside-toplevel
  d = parse_deployments("disaggregated:1:2, colocated:3:decode_first:2")
  assert [x.label for x in d] == ["disagg-1P2D-chunked", "colocated-3x-decode_first-tp2"]
  assert (d[1].num_instances, d[1].devices_per_instance) == (3, 2)
  for bad, match in (("pipelined:2", "unknown mode"), ("colocated:0", ">= 1"), ("colocated:2:fifo", "fifo"),
                     ("disaggregated:1", "disaggregated:P:D"), ("colocated:x", "integers")):
    with pytest.raises(ValueError, match=match):
      parse_deployments(bad)


def test_experiment_runs_deployments_and_records_transfers(tmp_path):
  import csv  # pylint: disable=import-outside-toplevel
  from pdopt import benchmark  # pylint: disable=import-outside-toplevel
  out = benchmark.run_experiment({
      "run_name": "d", "results_dir": str(tmp_path), "policies": "", "devices": 2, "progress": False,
      "deployments": "colocated:1,disaggregated:1:1",
      "workload": {"kind": "synthetic", "num_requests": 12, "rate": 20.0, "prompt_len": 40, "output_len": 6},
      "engine": ENGINE}, print_fn=None)
  entries = out["metrics"]
  assert set(entries) == {"colocated-1x-chunked", "disagg-1P1D-chunked"}
  assert all(e["completed"] == 12 for e in entries.values())
  assert entries["disagg-1P1D-chunked"]["num_transfers"] == 12
  assert entries["disagg-1P1D-chunked"]["kv_transfer_bytes"] > 0
  rows = list(csv.DictReader(open(tmp_path / "d" / "requests.csv", encoding="utf-8")))
  disagg = [r for r in rows if r["policy"] == "disagg-1P1D-chunked"]
  assert len(disagg) == 12 and all(float(r["kv_transfer_ms"]) > 0 for r in disagg)
  assert not _children()
