"""Import hygiene: the serving engine and the model import neither orbax nor FastAPI (a serving
process that never checkpoints or speaks HTTP should not pay for them), and the errors every
layer raises live in ``icarus_jax.errors``."""

import subprocess
import sys

import pytest

HEAVY = ("orbax", "fastapi", "uvicorn", "tensorflow_datasets", "grain", "gguf", "torch")


@pytest.mark.parametrize("module", ["icarus_jax.serving.engine", "icarus_jax.model.transformer", "icarus_jax.serving.runner",
                                    "icarus_jax.serving.async_engine", "icarus_jax.checkpoints.gguf_io"])
def test_serving_modules_do_not_import_heavy_dependencies(module):
  code = (f"import sys, {module}\n"
          f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"


def test_request_errors_live_in_errors_module():
  from icarus_jax import errors
  from icarus_jax.serving import engine
  assert engine.UnknownAdapterError is errors.UnknownAdapterError
  assert issubclass(errors.RequestTooLargeError, errors.IcarusError)


# ------------------------------------------------------------------------------ package layers
import ast  # noqa: E402
from pathlib import Path  # noqa: E402

PKG = Path(__file__).resolve().parents[1] / "icarus_jax"
#: Each subpackage may import only the layers below it; training and serving never import each
#: other. ``errors`` and ``flag_utils`` are the floor.
LAYER = {"errors": 0, "flag_utils": 0, "model": 1, "checkpoints": 2, "training": 3, "serving": 3,
         "bench": 4}


def _modules():
  for f in sorted(PKG.rglob("*.py")):
    rel = f.relative_to(PKG.parent).with_suffix("")
    name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    yield name, f


def _imports(path):
  """``(module, top_level)`` of every ``icarus_jax`` import in ``path``; top_level is False for
  imports inside functions (deferred)."""
  tree = ast.parse(path.read_text())
  top = {id(n) for n in tree.body}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("icarus_jax"):
      if node.module == "icarus_jax":
        # "from icarus_jax import x": x is a public re-export (or errors/flag_utils)
        out.extend((f"icarus_jax.{a.name}", id(node) in top) for a in node.names)
      else:
        out.append((node.module, id(node) in top))
    elif isinstance(node, ast.Import):
      out.extend((a.name, id(node) in top) for a in node.names if a.name.startswith("icarus_jax"))
  return out


def _layer_of(module):
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None


def test_subpackages_import_only_the_layers_below():
  bad = []
  for name, path in _modules():
    if name == "icarus_jax":
      continue  # the public facade re-exports from every layer
    own = _layer_of(name)
    for dep, _ in _imports(path):
      other = _layer_of(dep)
      if other not in LAYER or other == own:
        continue
      if LAYER[other] >= LAYER[own]:
        bad.append(f"{name} imports {dep}")
  assert not bad, bad


def test_no_import_cycles_between_modules():
  mods = dict(_modules())
  graph = {n: {d for d, top in _imports(p) if top and d in mods and d != n}
           for n, p in mods.items() if n != "icarus_jax"}
  for pkg_init in [n for n in graph if (PKG.parent / n.replace(".", "/") / "__init__.py").exists()]:
    graph[pkg_init] = set()  # a package's re-exports are not a dependency of its members
  seen, stack, cycles = {}, [], []

  def visit(n):
    seen[n] = 1
    stack.append(n)
    for d in sorted(graph.get(n, ())):
      if seen.get(d) == 1:
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in seen:
        visit(d)
    stack.pop()
    seen[n] = 2

  for n in sorted(graph):
    if n not in seen:
      visit(n)
  assert not cycles, cycles


def test_layer_walk_catches_a_planted_upward_import(tmp_path, monkeypatch):
  """The walk itself works: a model module importing serving is reported."""
  fake = tmp_path / "icarus_jax"
  (fake / "model").mkdir(parents=True)
  (fake / "serving").mkdir()
  (fake / "model" / "m.py").write_text("from icarus_jax.serving.engine import Engine\n")
  (fake / "serving" / "engine.py").write_text("from icarus_jax.model import m\n")
  monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
  with pytest.raises(AssertionError, match="icarus_jax.model.m imports icarus_jax.serving.engine"):
    test_subpackages_import_only_the_layers_below()
