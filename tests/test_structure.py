"""The structure the next engineer relies on (issue 15): no import cycle between rankfold's
modules, counting the imports inside functions too, so none can be hiding one."""

import ast
import os

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def module_imports() -> dict[str, set[str]]:
    modules = {}
    for directory, _dirs, files in os.walk(os.path.join(SRC, "rankfold")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                modules[module] = path
    graph = {}
    for module, path in modules.items():
        found = set()
        with open(path) as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        # the package's lazy __init__ imports nothing at import time
        graph[module] = {m for m in found if m in modules and m not in (module, "rankfold")}
    return graph


def test_no_import_cycle_anywhere_in_the_package():
    graph = module_imports()
    assert "rankfold.apply" in graph and "rankfold.planner.plan" in graph
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for dependency in sorted(graph[module]):
            visit(dependency, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_front_door_is_imported_by_nothing_inside():
    graph = module_imports()
    assert [m for m, deps in graph.items() if "rankfold.compress" in deps] == []
