"""Shared fixtures: a tiny random base model and adapters, built once per session; a helper
that serves an ASGI app on a free localhost port."""

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":
  # libtpu only compiles here (compile-only TPU topologies, tests/test_tpu_aot.py): let every
  # pytest-xdist worker load it (by default one process per host holds libtpu's lockfile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

from icarus_jax import init_adapter, init_base_params, tiny_config  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HF_FIXTURES = FIXTURES / "hf"


# Modules with the longest tests (``pytest --durations``: the 8-device sharding check is one
# ~5-minute fixture, the AOT compiles ~15 minutes of CPU in all, the accuracy, notebook and
# packaging runs 1.5-2 minutes each) run first, so the two xdist workers start them early and
# finish together instead of one waiting on a late long test: CI's limit is wall time.
RUN_FIRST = ("test_sharding.py", "test_accuracy_table.py", "test_notebook.py", "test_packaging.py",
             "test_tpu_aot.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(RUN_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: module order kept


@pytest.fixture(scope="session")
def tiny():
  cfg = tiny_config()
  params = init_base_params(cfg, jax.random.key(0), scale=0.1)
  return cfg, params


@pytest.fixture(scope="session")
def tiny_adapters(tiny):
  """Three random ICaRus-LoRA adapters with non-zero B (so they really differ from the base)."""
  cfg, params = tiny
  return [init_adapter(cfg, jax.random.key(10 + i), name=f"agent{i}", base_params=params,
                       rank=4 + 2 * i, b_std=0.05) for i in range(3)]


@pytest.fixture
def rng():
  return np.random.RandomState(1234)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drop jit caches after each test module: the suite compiles hundreds of programs (Pallas
  interpret-mode kernels among them) and one process should not hold them all at once."""
  yield
  jax.clear_caches()


@contextlib.contextmanager
def serving(app):
  """Runs ``app`` under uvicorn on 127.0.0.1 (a free port) in a thread; yields the port."""
  import uvicorn
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  th = threading.Thread(target=srv.run, daemon=True)
  th.start()
  for _ in range(200):
    if srv.started:
      break
    time.sleep(0.05)
  assert srv.started
  try:
    yield port
  finally:
    srv.should_exit = True
    th.join(10)


def wait_for(cond, timeout: float = 30.0) -> bool:
  """Polls ``cond()`` every 50 ms until it is true (True) or ``timeout`` seconds pass (False)."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    if cond():
      return True
    time.sleep(0.05)
  return False


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def healthy(url: str) -> bool:
  """Whether a server at ``url`` answers ``/health`` with 200."""
  import httpx
  try:
    return httpx.get(url + "/health", timeout=1).status_code == 200
  except httpx.HTTPError:
    return False
