"""The package installs with ``pip install .`` into an empty venv (its runtime dependencies
declared in pyproject.toml), with every subpackage, its configs and its embedded assets: imported
from elsewhere (the checkout is not on the path), it finds the model presets, the sharding rules
and the embedded base, and its console scripts run."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_then_import_elsewhere(tmp_path):
  """``pip install .`` resolves the runtime dependencies declared in pyproject.toml into an empty
  venv; the package then imports from an unrelated directory and the console scripts run; an
  editable install of the checkout points the same venv at the source tree."""
  src, venv, elsewhere = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
  shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
      ".git", ".venv", "runs", "out", "build", "*.egg-info", "__pycache__", "tests", "docs",
      "notebooks"))
  elsewhere.mkdir()
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  py = venv / "bin" / "python"
  r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(src)], capture_output=True,
                     text=True, cwd=elsewhere)
  assert r.returncode == 0, r.stderr[-3000:]
  env = {"JAX_PLATFORMS": "cpu", "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
  code = ("import icarus_jax, icarus_jax.serving.server, icarus_jax.training.finetune, "
          "icarus_jax.bench.harness, icarus_jax.checkpoints.hf, kernels_pallas.reference\n"
          "from icarus_jax.model.chat_template import ChatTemplate\n"
          "from icarus_jax.model.config import list_presets, ModelConfig\n"
          "from icarus_jax.model.sharding import load_rules\n"
          "from icarus_jax.checkpoints.assets import load_any_base\n"
          "print(icarus_jax.__file__)\n"
          "print(sorted(list_presets()))\n"
          "print(ModelConfig.from_preset('tiny').d_model, len(load_rules()))\n"
          "cfg, params = load_any_base(None)\n"
          "print(cfg.name, params['embed'].shape)\n")
  r = subprocess.run([str(py), "-c", code], cwd=elsewhere, capture_output=True, text=True,
                     env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  assert str(venv) in lines[0]  # the installed copy, not the checkout
  # every subpackage, the configs and the embedded assets are in the installed package
  assert {"tiny", "small", "llama-3.1-8b", "qwen3-8b"} <= set(eval(lines[1]))
  assert int(lines[2].split()[0]) > 0 and int(lines[2].split()[1]) > 0
  assert lines[3].split()[0] == "small"
  for script, flag in (("icarus-train", "--eval_fraction"), ("icarus-serve", "--adapters")):
    r = subprocess.run([str(venv / "bin" / script), "--helpfull"], cwd=elsewhere,
                       capture_output=True, text=True, env=env)
    assert flag in r.stdout, (r.stdout + r.stderr)[-2000:]  # absl exits 1 after --helpfull
  r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(src)],
                     capture_output=True, text=True, cwd=elsewhere)
  assert r.returncode == 0, r.stderr[-3000:]
  r = subprocess.run([str(py), "-c", code], cwd=elsewhere, capture_output=True, text=True,
                     env=env)
  assert r.returncode == 0 and str(src) in r.stdout.splitlines()[0], r.stderr[-2000:]
