"""The direction of dependencies (issue 15): services depend on the shared package, never the other
way round; the three services do not import each other; and no module imports itself through
others. grimp builds the graph from the source, function-local imports included (those used to
hide a wrong-way dependency)."""

from __future__ import annotations

import graphlib

import grimp
import pytest

SERVICES = ("services.encoder", "services.ranker", "services.gateway")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("anime2vec", "services", "bench", "experiments", "tests", cache_dir=None)


def _imports(graph, prefix: str) -> dict[str, set[str]]:
    return {
        m: graph.find_modules_directly_imported_by(m)
        for m in graph.modules
        if m == prefix or m.startswith(prefix + ".")
    }


def test_the_shared_package_imports_no_service_bench_experiment_or_test(graph):
    wrong = {
        (m, d)
        for m, ds in _imports(graph, "anime2vec").items()
        for d in ds
        if d.split(".")[0] in ("services", "bench", "experiments", "tests")
    }
    assert not wrong, f"the shared package reaches up: {sorted(wrong)}"


def test_services_do_not_import_each_other(graph):
    wrong = {
        (m, d)
        for s in SERVICES
        for m, ds in _imports(graph, s).items()
        for d in ds
        if d.startswith("services.") and not (d == s or d.startswith(s + "."))
    }
    assert not wrong, sorted(wrong)


def test_no_import_cycles(graph):
    """Between modules of the package, the services and the bench (a cycle only works by the order
    modules happen to load in, and makes neither half usable alone)."""
    deps = {
        m: {d for d in ds if d.split(".")[0] != "tests"}
        for top in ("anime2vec", "services", "bench", "experiments")
        for m, ds in _imports(graph, top).items()
    }
    try:
        tuple(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_the_graph_sees_function_local_imports(graph, tmp_path, monkeypatch):
    """The checks above would pass vacuously if a local import were invisible to them."""
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from probe_pkg import b\n    return b\n")
    (pkg / "b.py").write_text("from probe_pkg import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    g = grimp.build_graph("probe_pkg", cache_dir=None)
    assert g.direct_import_exists(importer="probe_pkg.a", imported="probe_pkg.b")
    deps = {m: g.find_modules_directly_imported_by(m) for m in g.modules}
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter(deps).static_order())
