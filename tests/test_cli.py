"""The ``glajax`` command line dispatches to its subcommands."""
import sys
import types

import pytest

from glajax import cli


def test_demo_passes_its_arguments(monkeypatch, tmp_path):
  seen = []
  fake_demo = types.ModuleType("glajax.demo")  # the real one is tested in test_demo*.py
  fake_demo.main = lambda args: seen.append(args) or 0
  monkeypatch.setitem(sys.modules, "glajax.demo", fake_demo)
  assert cli.main(["demo", "--workdir", str(tmp_path), "--quick"]) == 0
  assert (seen[0].workdir, seen[0].quick, seen[0].seed) == (str(tmp_path), True, 0)
  assert cli.main(["demo"]) == 0
  assert (seen[1].workdir, seen[1].quick) == ("glajax-demo", False)


def test_demo_missing_says_so(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "glajax.demo", None)  # import now raises ModuleNotFoundError
  assert cli.main(["demo"]) == 1
  assert "no glajax.demo package" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
  assert cli.main([]) == 2
  assert "demo" in capsys.readouterr().err
  with pytest.raises(SystemExit) as info:
    cli.main(["--help"])
  assert info.value.code == 0
  with pytest.raises(SystemExit):
    cli.main(["nonsense"])


def test_errors_and_ctrl_c_end_with_one_line(monkeypatch, tmp_path, capsys):
  from glajax.errors import ConfigError
  fake_demo = types.ModuleType("glajax.demo")

  def interrupted(args):
    raise KeyboardInterrupt

  fake_demo.main = interrupted
  monkeypatch.setitem(sys.modules, "glajax.demo", fake_demo)
  assert cli.main(["demo", "--workdir", str(tmp_path)]) == 130
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "interrupted" in err and str(tmp_path) in err
  assert "run the same command again to resume" in err

  def bad(args):
    raise ConfigError("seed: expected an integer, found 'x'")

  fake_demo.main = bad
  assert cli.main(["demo"]) == 1
  assert capsys.readouterr().err == "glajax demo: seed: expected an integer, found 'x'\n"
