"""The command line of `experiments.run`: one-line errors (exit code 2) before anything loads, `--dry_run`,
and quiet logs unless `-v`."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("args,match", [
    (["--config=configs/quickstart.py", "--config.nope=1"], "--config.nope: config has no field 'nope'; valid: "),
    (["--config=configs/quickstart.py", "--config.workload.nmu=3"], "config.workload has no field 'nmu'"),
    (["--config=configs/missing.py"], "--config=configs/missing.py: no such file; valid: a config file such as"),
    (["--config=configs/quickstart.py", "--config.hf_dir=/nonexistent"], "config.hf_dir='/nonexistent' does not"),
    (["--config=configs/quickstart.py", "--config.workload.path=nope.csv"],
     "config.workload.path='nope.csv': no such file; valid: "),
    (["--config=configs/quickstart.py", "--config.policies=fcfs"], "unknown policy 'fcfs'; valid: chunked"),
    (["--config=configs/quickstart.py", "--config.rate=fast"], "--config.rate=fast"),
    (["--config=configs/quickstart.py", "--bogus"], "bogus"),
    ([], "--config is required"),
], ids=["key", "nested-key", "file", "hf_dir", "trace", "policy", "value", "flag", "no-config"])
def test_errors_are_one_line_with_exit_code_2(args, match, tmp_path):
  out = _run(*args, f"--config.results_dir={tmp_path}" if args else "--dry_run")
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
  assert match in out.stderr
  assert "Traceback" not in out.stderr and out.stdout == ""
  assert not any(tmp_path.iterdir())


def test_dry_run_prints_the_resolved_config(tmp_path):
  out = _run("--config=configs/quickstart.py", "--config.workload.num_requests=7", "--dry_run",
             f"--config.results_dir={tmp_path}")
  assert out.returncode == 0, out.stderr
  config = json.loads(out.stdout)
  assert config["workload"]["num_requests"] == 7 and config["run_name"] == "quickstart"
  assert "pdopt/benchmark/config.py" in out.stderr and not any(tmp_path.iterdir())


def test_quiet_unless_asked():
  # Without JAX_PLATFORMS, JAX probes its plugins and logs at INFO ("Unable to initialize backend 'tpu'").
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  quiet = subprocess.run([sys.executable, "-m", "experiments.run", "--config=configs/quickstart.py", "--dry_run"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
  assert quiet.returncode == 0, quiet.stderr
  assert quiet.stderr.strip().splitlines() == ["# valid; every field is documented in pdopt/benchmark/config.py"]
  code = ("from absl import app, logging; from pdopt.benchmark import cli; "
          "app.run(lambda argv: logging.info('info-line'), flags_parser=cli.flags_parser())")
  for args, shown in (([], False), (["-v"], True), (["--verbosity=0"], True)):
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0 and ("info-line" in out.stderr) == shown, (args, out.stderr)


def test_helpfull_names_where_fields_are_documented():
  out = _run("--helpfull")
  assert "pdopt/benchmark/config.py" in out.stdout + out.stderr


POLICY_CONFIG = '''
from pdopt.benchmark import default_config
from pdopt.scheduling.policy import Plan, SchedulerView, SchedulingConfig, StepBuilder, register


@register("shortest_first")
class ShortestFirst:
  """Decodes first, then prompts: running ones, then waiting ones shortest first."""

  def __init__(self, config: SchedulingConfig):
    self.config = config

  def schedule(self, view: SchedulerView) -> Plan:
    budget = self.config.max_num_batched_tokens
    step = StepBuilder(view, budget, self.config.max_num_seqs)
    step.schedule_decodes(view.running)
    for request in [*view.running, *sorted(view.waiting, key=lambda r: r.prompt_len)]:
      if request.request_id not in step.preempted and not step.scheduled(request.request_id):
        step.add(request, step.fit_chunk(request, budget))
    step.ensure_progress(view.running, budget)
    return step.plan()


def get_config():
  config = default_config()
  config.run_name = "mine"
  config.policies = "shortest_first,chunked"
  config.backend = "sim"
  config.progress = False
  config.workload.update(dict(num_requests=12, rate=20.0, prompt_len=64, output_len=8,
                              length_distribution="uniform", range_ratio=0.9))
  config.engine.update(dict(num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256))
  return config
'''


def test_a_config_file_registers_its_own_policy(tmp_path):
  """The README's example: a policy defined and registered in the config file runs like a shipped one."""
  (tmp_path / "my_policy.py").write_text(POLICY_CONFIG)
  out = _run(f"--config={tmp_path / 'my_policy.py'}", f"--config.results_dir={tmp_path / 'results'}")
  assert out.returncode == 0, out.stderr
  written = json.loads((tmp_path / "results" / "mine" / "metrics.json").read_text())
  assert list(written) == ["shortest_first", "chunked"]
  assert written["shortest_first"]["completed"] == 12 and written["shortest_first"]["backend"] == "sim"


def test_plot_results_draws_the_readme_charts_from_the_kept_data(tmp_path):
  """Every chart of the README's Results section is drawn from the JSON files kept in docs/benchmarks/."""
  from experiments import plot_results  # pylint: disable=import-outside-toplevel
  paths = plot_results.plot_all(REPO / "docs" / "benchmarks", tmp_path)
  assert [p.name for p in paths] == ["prefill_attention.png", "decode_attention.png", "engine_decode.png",
                                     "policies_azure.png"]
  for path in paths:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (REPO / "docs" / "benchmarks" / path.name).is_file()
