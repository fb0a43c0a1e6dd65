"""What the entry points in `experiments/` share on the command line: errors in one line, quiet logs.

`app.run(main, flags_parser=cli.flags_parser())` instead of absl's default parser:

* A mistake on the command line (an unknown flag, a missing or broken `--config` file, an override of a
  config field that does not exist, a value of the wrong type) prints one line, `error: ...`, naming the value
  and what would be valid, to stderr and exits with code 2: no traceback, no screen of usage. `fail` does
  the same for errors `main` finds (a `ConfigError` of the experiment, say).
* Logs are quiet unless asked for: absl's verbosity defaults to WARNING, so library INFO lines (orbax's
  checkpoint reads, JAX's "Unable to initialize backend 'tpu'") stay hidden; `-v` shows INFO lines,
  `--verbosity=1` debug ones.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from typing import Callable, NoReturn, Sequence

import ml_collections
from absl import flags, logging

EXIT_USAGE = 2


def fail(message: str) -> NoReturn:
  """Prints `error: <message>` (one line) to stderr and exits with code 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def flags_parser(config_flag: str = "config", documented_in: str = "pdopt/benchmark/config.py"
                 ) -> Callable[[list[str]], list[str]]:
  """A `flags_parser` for `absl.app.run` that reports command-line mistakes in one line (module docstring).

  Args:
    config_flag: the name of the `config_flags.DEFINE_config_file` flag whose file and overrides are checked.
    documented_in: where the config's fields are documented (named in the errors).

  Returns:
    The parser: argv -> the arguments left after the flags.
  """

  def parse(argv: list[str]) -> list[str]:
    argv = _expand_verbose(list(argv))
    _check_config_args(argv[1:], config_flag, documented_in)
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      fail(str(e))
    except Exception as e:  # pylint: disable=broad-except
      fail(f"{type(e).__name__}: {e}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    return rest

  return parse


def _expand_verbose(argv: list[str]) -> list[str]:
  """A bare `-v` asks for INFO logs (absl's `-v` wants a level: `-v 0`)."""
  out = []
  for i, arg in enumerate(argv):
    nxt = argv[i + 1] if i + 1 < len(argv) else ""
    if arg == "-v" and not nxt.lstrip("-").isdigit():
      out.append("--verbosity=0")
    else:
      out.append(arg)
  return out


def _config_path(args: Sequence[str], config_flag: str) -> str | None:
  for i, arg in enumerate(args):
    if arg.startswith(f"--{config_flag}="):
      return arg.split("=", 1)[1]
    if arg == f"--{config_flag}" and i + 1 < len(args):
      return args[i + 1]
  return None


def _check_config_args(args: Sequence[str], config_flag: str, documented_in: str) -> None:
  """Fails with one line on a missing or broken config file, or an override of a field it does not have."""
  path = _config_path(args, config_flag)
  if path is None:
    return
  file = pathlib.Path(path)
  if not file.is_file() and ":" in path:  # config_flags' "file.py:argument" form
    file = pathlib.Path(path.split(":", 1)[0])
  if not file.is_file():
    siblings = sorted(str(p) for p in (file.parent if file.parent.is_dir() else pathlib.Path("configs")).glob("*.py")
                      if not p.name.startswith("_"))
    fail(f"--{config_flag}={path}: no such file; valid: a config file such as "
         f"{', '.join(siblings) or 'configs/quickstart.py'}")
  try:
    spec = importlib.util.spec_from_file_location("_pdopt_cli_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    fail(f"--{config_flag}={path} could not be loaded: {type(e).__name__}: {e}")
  prefix = f"--{config_flag}."
  for arg in args:
    if not arg.startswith(prefix):
      continue
    name = arg[len(prefix):].split("=", 1)[0]
    node = config
    for depth, part in enumerate(name.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        owner = ".".join([config_flag, *name.split(".")[:depth]])
        valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
        fail(f"{prefix}{name}: {owner} has no field {part!r}; valid: {valid} (every field is documented in "
             f"{documented_in})")
      node = node[part]
