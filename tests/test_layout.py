"""The package's structure (ARCHITECTURE.md "Layers"): layers import only those below them, there
is no import cycle, function-local imports say why they are there, and the orchestration code
stays in small functions."""
import ast
import re
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "glajax"

# Lowest first; a module may import its own layer and those before it.
LAYERS = (
    ("glajax.errors", "glajax.io", "glajax.parallel", "glajax.schema"),
    ("glajax.methods",),
    ("glajax.models",),
    ("glajax.zeroshot",),
    ("glajax.data",),
    ("glajax.evaluate",),
    ("glajax.train",),
    ("glajax.experiments",),
    ("glajax.demo",),
    ("glajax.cli", "glajax"),
)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
  best = None
  for index, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + "."):
        if best is None or len(prefix) > best[1]:
          best = (index, len(prefix))
  assert best is not None, module
  return best[0]


def _imports(tree: ast.AST, module: str):
  """(imported glajax module, line, function-local?) of every import in ``tree``."""
  local_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                                      ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      names = [f"{base}.{a.name}" if f"{base}.{a.name}".replace(".", "/") and (
          PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
          or (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).is_dir()
          else base for a in node.names]
    else:
      continue
    for name in names:
      if name == "glajax" or name.startswith("glajax."):
        yield name, node.lineno, node.lineno in local_lines


def _modules():
  """The package's modules; a model family's tests (``models/<family>/tests``) are not."""
  for path in sorted(PACKAGE.rglob("*.py")):
    if "tests" not in path.relative_to(PACKAGE).parts:
      yield path, _module_name(path), ast.parse(path.read_text())


def test_layers_point_one_way():
  violations = []
  for path, module, tree in _modules():
    for imported, line, _ in _imports(tree, module):
      if imported == "glajax" and module != "glajax" and not module.startswith("glajax.cli"):
        # `import glajax` for its public API (load_clip, save_clip...): the models layer.
        imported = "glajax.models"
      if _layer(imported) > _layer(module):
        violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} {module} -> {imported}")
  assert not violations, "imports from a lower layer to a higher one:\n" + "\n".join(violations)


def test_no_import_cycle():
  graph = {}
  for _, module, tree in _modules():
    graph.setdefault(module, set()).update(
        i for i, _, local in _imports(tree, module) if not local and i != module
        and i != "glajax")
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      nxt = nxt if nxt in graph else nxt.rsplit(".", 1)[0]
      if state.get(nxt) == "open":
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      if nxt in graph and nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_function_local_imports_say_why():
  """Allowed only to keep a heavy or optional package (TensorFlow, TFDS, torch, matplotlib,
  tensorboard, transformers) off an import path, or for the lazy public API; each such line says
  why in a comment (a bare pylint directive is no reason)."""
  unexplained = []
  for path, module, tree in _modules():
    lines = path.read_text().splitlines()
    local = {n.lineno for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for line in sorted(local):
      text = lines[line - 1]
      reason = re.sub(r"pylint: disable=[\w,-]+", "", text.partition("#")[2]).strip()
      if not reason:
        unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text.strip()}")
  assert not unexplained, "function-local imports without a reason:\n" + "\n".join(unexplained)


@pytest.mark.parametrize("folder", ["experiments", "demo", "train/engine.py"])
def test_orchestration_functions_are_short(folder):
  long = []
  root = PACKAGE / folder
  for path in ([root] if root.is_file() else sorted(root.rglob("*.py"))):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 60:
          long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} "
                      f"({length} lines)")
  assert not long, "functions over 60 lines:\n" + "\n".join(long)
