"""No import cycles between the project's modules (recalib, service, worker).

The graph is grimp's (the library import-linter builds on), so imports inside functions and
under ``TYPE_CHECKING`` count as much as those at the top of a module: an import moved into a
function to dodge a cycle still is one. Each cycle is reported as a chain of imports, with the
line of every import, so the message alone says which import to remove.
"""

from __future__ import annotations

import itertools

import grimp
import pytest

ROOT_PACKAGES = ("recalib", "service", "worker")


def strongly_connected_components(graph: grimp.ImportGraph) -> list[set[str]]:
    """Tarjan's algorithm, iterative (a recursive one could pass Python's recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    imported = sorted(graph.find_modules_directly_imported_by(successor))
                    work.append((successor, iter(imported)))
                    break
                if successor in on_stack:
                    low[module] = min(low[module], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == index[module]:
                    component: set[str] = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == module:
                            break
                    components.append(component)
    return components


def one_cycle(graph: grimp.ImportGraph, component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (sorted), as a chain of modules."""
    start = min(component)
    best: tuple[str, ...] | None = None
    for successor in sorted(graph.find_modules_directly_imported_by(start) & component):
        back = graph.find_shortest_chain(importer=successor, imported=start)
        if back is not None and (best is None or len(back) < len(best)):
            best = back
    if best is None:  # unreachable for a component of two or more modules
        return [start]
    return [start, *best]


def describe(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    """``a -> b  (line 12: from b import x)``: the import and where ``a`` makes it."""
    details = graph.get_import_details(importer=importer, imported=imported)
    where = "; ".join(f"line {d['line_number']}: {d['line_contents']}" for d in details)
    return f"{importer} -> {imported}  ({where})"


def find_cycles(graph: grimp.ImportGraph) -> list[str]:
    """One readable report per group of modules that import each other."""
    reports = []
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue
        chain = one_cycle(graph, component)
        inside = [
            describe(graph, importer, imported)
            for importer in sorted(component)
            for imported in sorted(graph.find_modules_directly_imported_by(importer) & component)
        ]
        reports.append(
            "\n".join(
                [
                    f"{len(component)} modules import each other: {', '.join(sorted(component))}",
                    f"  the shortest cycle through {chain[0]}:",
                    *(f"    {describe(graph, a, b)}" for a, b in itertools.pairwise(chain)),
                    "  every import between them:",
                    *(f"    {line}" for line in inside),
                ]
            )
        )
    return sorted(reports)


def test_no_import_cycles_between_project_modules() -> None:
    graph = grimp.build_graph(*ROOT_PACKAGES, include_external_packages=False)
    cycles = find_cycles(graph)
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles), pytrace=False)


def test_the_cycle_finder_reports_an_indirect_cycle_as_its_chain() -> None:
    graph = grimp.ImportGraph()
    for module in ("pkg.a", "pkg.b", "pkg.c", "pkg.d"):
        graph.add_module(module)
    for importer, imported in (("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.a")):
        graph.add_import(importer=importer, imported=imported, line_number=3, line_contents="x")
    graph.add_import(importer="pkg.d", imported="pkg.a", line_number=1, line_contents="x")
    cycles = find_cycles(graph)
    assert len(cycles) == 1
    cycle = ["pkg.a -> pkg.b  (line 3: x)", "pkg.b -> pkg.c  (line 3: x)", "pkg.c -> pkg.a"]
    assert "\n    ".join(cycle) in cycles[0]
    assert "pkg.d" not in cycles[0]
