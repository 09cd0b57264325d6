"""The package's import graph has no cycles.

The graph is read from the source (``ast``), not from ``sys.modules``: an edge
a -> b for every ``import`` in module a that names module b of the package,
at module level and inside functions (a function-level import still closes a
cycle, it only defers it). Imports under ``if TYPE_CHECKING:`` never run and
are left out. ``from p import name`` is an edge to ``p.name`` if that is a
module, else to ``p``; the implicit import of a module's parent packages is
not an edge (every module would otherwise depend on ``jaxspeed/__init__``).
"""

from __future__ import annotations

import ast
import pathlib

import jaxspeed

PACKAGE = pathlib.Path(jaxspeed.__file__).parent


def module_files(package: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every ``.py`` file under ``package``."""
  modules = {}
  for path in sorted(package.rglob("*.py")):
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    modules[".".join(parts)] = path
  return modules


def _is_type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool):
  """The dotted names an import statement in ``module`` may load, most specific first."""
  if isinstance(node, ast.Import):
    return [[alias.name] for alias in node.names]
  base = node.module or ""
  if node.level:  # relative: from the module's package, up level - 1 packages
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
      package = package.rpartition(".")[0]
    base = f"{package}.{base}" if base else package
  return [[f"{base}.{alias.name}", base] for alias in node.names]


def import_graph(package: pathlib.Path) -> dict[str, dict[str, bool]]:
  """module -> {imported module: True if only imported inside functions}."""
  modules = module_files(package)

  def resolve(name: str) -> str | None:
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name or None

  graph: dict[str, dict[str, bool]] = {}
  for module, path in modules.items():
    edges: dict[str, bool] = {}
    is_package = path.name == "__init__.py"

    def visit(nodes, in_function: bool, module=module, edges=edges, is_package=is_package):
      for node in nodes:
        if isinstance(node, ast.If) and _is_type_checking(node):
          visit(node.orelse, in_function)
          continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          for candidates in _imported_names(node, module, is_package):
            target = next((c for c in candidates if c in modules), None) or resolve(
                candidates[-1])
            if target and target != module:
              edges[target] = edges.get(target, True) and in_function
          continue
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.Lambda))
        visit(ast.iter_child_nodes(node), inner)

    visit(ast.parse(path.read_text(), str(path)).body, False)
    graph[module] = edges
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle [a, b, ..., a] per strongly connected component with more than one module."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  components = []

  def connect(v: str) -> None:  # Tarjan's algorithm
    index[v] = low[v] = len(index)
    stack.append(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while not component or component[-1] != v:
        component.append(stack.pop())
      if len(component) > 1:
        components.append(set(component))

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
  """The shortest cycle through the component's first module (breadth-first)."""
  start = min(component)
  parents: dict[str, str] = {}
  frontier = [start]
  while frontier:
    following = []
    for v in frontier:
      for w in sorted(graph[v] & component):
        if w == start:
          path = [v]
          while path[-1] != start:
            path.append(parents[path[-1]])
          return [start, *reversed(path[:-1]), start] if v != start else [start, start]
        if w not in parents:
          parents[w] = v
          following.append(w)
    frontier = following
  raise AssertionError(f"no cycle in component {sorted(component)}")


def _edges(graph: dict[str, dict[str, bool]], function_level: bool) -> dict[str, set[str]]:
  return {m: {t for t, deferred in edges.items() if function_level or not deferred}
          for m, edges in graph.items()}


def test_finds_and_names_a_cycle(tmp_path):
  package = tmp_path / "pkg"
  (package / "sub").mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "sub" / "__init__.py").write_text("from pkg.sub.b import g\n")
  (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                "  from pkg.sub import b\nimport os\n")
  (package / "sub" / "b.py").write_text("def g():\n  from pkg.sub import c\n")
  (package / "sub" / "c.py").write_text("from . import b\nfrom ..a import x\n")
  graph = import_graph(package)
  assert graph["pkg.a"] == {}  # TYPE_CHECKING and outside imports are not edges
  assert graph["pkg.sub.b"] == {"pkg.sub.c": True}
  assert graph["pkg.sub.c"] == {"pkg.sub.b": False, "pkg.a": False}
  assert find_cycles(_edges(graph, function_level=False)) == []
  assert find_cycles(_edges(graph, function_level=True)) == [["pkg.sub.b", "pkg.sub.c",
                                                              "pkg.sub.b"]]


def test_jaxspeed_has_no_import_cycles():
  graph = import_graph(PACKAGE)
  assert "jaxspeed.models.layers" in graph["jaxspeed.moe.layer"]  # the graph is read
  cycles = find_cycles(_edges(graph, function_level=True))
  assert not cycles, "import cycles (module-level and function-level imports):\n" + "\n".join(
      " -> ".join(cycle) for cycle in cycles)
