"""Import hygiene: the serving engine and the model import neither orbax nor FastAPI (a serving
process that never checkpoints or speaks HTTP should not pay for them), and the errors every
layer raises live in ``icarus_jax.errors``."""

import subprocess
import sys

import pytest

HEAVY = ("orbax", "fastapi", "uvicorn", "tensorflow_datasets", "grain", "gguf", "torch")


@pytest.mark.parametrize("module", ["icarus_jax.engine", "icarus_jax.model", "icarus_jax.runner",
                                    "icarus_jax.async_engine", "icarus_jax.gguf_checkpoint"])
def test_serving_modules_do_not_import_heavy_dependencies(module):
  code = (f"import sys, {module}\n"
          f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"


def test_request_errors_live_in_errors_module():
  from icarus_jax import engine, errors
  assert engine.UnknownAdapterError is errors.UnknownAdapterError
  assert issubclass(errors.RequestTooLargeError, errors.IcarusError)
