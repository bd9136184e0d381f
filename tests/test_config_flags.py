"""Launch flags are generated from the config dataclasses (one name, default and check per knob):
``launch.serve`` from ``EngineConfig``, ``launch.train`` from ``TrainConfig``."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from icarus_jax.serving.engine_config import EngineConfig
from icarus_jax.errors import IcarusError
from icarus_jax.flag_utils import dataclass_from_flags, define_dataclass_flags
from icarus_jax.training.objective import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_flags_from_dataclass_types_defaults_aliases():
  fv = flags.FlagValues()
  names = define_dataclass_flags(EngineConfig, defaults={"num_pages": 99},
                                 aliases={"kv_pages": "num_pages"}, flag_values=fv)
  assert names == [f.name for f in dataclasses.fields(EngineConfig)]
  fv(["prog", "--kv_pages=64", "--mode=isolated", "--max_seq_len=128", "--mixed_steps"])
  ec = dataclass_from_flags(EngineConfig, flag_values=fv)
  assert ec == EngineConfig(num_pages=64, mode="isolated", max_seq_len=128, mixed_steps=True)
  fv2 = flags.FlagValues()
  define_dataclass_flags(EngineConfig, defaults={"num_pages": 99}, flag_values=fv2)
  fv2(["prog"])
  assert dataclass_from_flags(EngineConfig, flag_values=fv2) == EngineConfig(num_pages=99)
  with pytest.raises(flags.IllegalFlagValueError):
    fv2(["prog", "--mode=shared"])  # an enum: the choices come from the field's metadata
  tv = flags.FlagValues()
  define_dataclass_flags(TrainConfig, flag_values=tv)
  tv(["prog", "--targets=q,o", "--learning_rate=0.01"])
  tc = dataclass_from_flags(TrainConfig, flag_values=tv)
  assert tc.targets == ("q", "o") and tc.learning_rate == 0.01 and tc.total_steps == 300


def test_engine_config_checks_every_knob():
  for bad, match in [(dict(mode="shared"), "mode='shared' is unknown; accepted"),
                     (dict(num_pages=0), "num_pages must be a positive int"),
                     (dict(attention_backend="triton"), "attention_backend='triton' is unknown"),
                     (dict(max_host_adapters=-1), "max_host_adapters must be >= 0")]:
    with pytest.raises(IcarusError, match=match):
      EngineConfig(**bad)


def _run(code):
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_launch_scripts_declare_each_field_once():
  serve = _run(
      "import json, dataclasses, launch.serve\n"
      "from absl import flags\n"
      "from icarus_jax.serving.engine_config import EngineConfig\n"
      "from icarus_jax.flag_utils import dataclass_from_flags\n"
      "F = flags.FLAGS; F(['serve', '--kv_pages=64', '--max_batch=2'])\n"
      "print(json.dumps(dataclasses.asdict(dataclass_from_flags(EngineConfig))))")
  assert serve == dataclasses.asdict(EngineConfig(num_pages=64, max_batch=2, max_adapters=16))
  train = _run(
      "import json, dataclasses, launch.train\n"
      "from absl import flags\n"
      "from icarus_jax.training.objective import TrainConfig\n"
      "F = flags.FLAGS; F(['train', '--lr=0.01', '--steps=5', '--warmup=2'])\n"
      "print(json.dumps({f.name: F[f.name].value for f in dataclasses.fields(TrainConfig)}))")
  assert set(train) == {f.name for f in dataclasses.fields(TrainConfig)}
  assert (train["learning_rate"], train["total_steps"], train["warmup_steps"]) == (0.01, 5, 2)
