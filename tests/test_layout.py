"""The package's layering rules, checked on the source: the core knows no method, methods never
import each other, models and losses stay pure, configs import no training code, and the
module-level import graph has no cycles."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(top: str) -> dict[str, str]:
  """{dotted module name: file} of every .py file under ROOT/top."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


MODULES = {**_modules("vlp_jax"), **_modules("configs"), **_modules("launch")}


def _imports(path: str, top_level_only: bool) -> set[str]:
  """Modules a file imports (`from pkg import sub` counts as pkg.sub when that is a module)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  out = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in MODULES else node.module)
  return out


def test_core_imports_no_method():
  for name, path in MODULES.items():
    if name.startswith("vlp_jax.core"):
      bad = [m for m in _imports(path, False) if m.startswith("vlp_jax.methods")]
      assert not bad, (name, bad)


def test_methods_never_import_each_other():
  for name, path in MODULES.items():
    parts = name.split(".")
    if len(parts) > 2 and parts[:2] == ["vlp_jax", "methods"]:
      own = ".".join(parts[:3])
      bad = [m for m in _imports(path, False)
             if m.startswith("vlp_jax.methods.") and not m.startswith(own)]
      assert not bad, (name, bad)


@pytest.mark.parametrize("layer", ["vlp_jax.models", "vlp_jax.losses"])
def test_models_and_losses_import_only_jax_flax_optax(layer):
  allowed = ("jax", "flax", "optax", "numpy", "math", "dataclasses", "functools", "typing",
             "collections", "__future__", "vlp_jax.models", "vlp_jax.losses")
  for name, path in MODULES.items():
    if name.startswith(layer):
      bad = [m for m in _imports(path, False) if not m.startswith(allowed)]
      assert not bad, (name, bad)


def test_configs_import_only_the_config_helpers():
  for name, path in MODULES.items():
    if name.startswith("configs."):
      bad = [m for m in _imports(path, False)
             if m.startswith("vlp_jax") and m not in ("vlp_jax.config", "vlp_jax")]
      assert not bad, (name, bad)


def test_no_import_cycles():
  graph = {name: {m for m in _imports(path, True) if m in MODULES and m != name}
           for name, path in MODULES.items()}
  state: dict[str, int] = {}  # 1 = on the stack, 2 = done

  def visit(node, stack):
    state[node] = 1
    for nxt in sorted(graph[node]):
      # A package's __init__ importing its own submodules is not a cycle Python trips on.
      if node.startswith(nxt + ".") or nxt.startswith(node + "."):
        continue
      if state.get(nxt) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
      if nxt not in state:
        visit(nxt, stack + [node])
    state[node] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [])
