"""The package's import structure: every module imports on its own in a fresh interpreter, and the
import graph of ``fusedadapter`` (with ``kernels/`` and ``csrc/`` where they are installed, as
``fusedadapter.kernels`` and ``fusedadapter.csrc``) has no cycle, counting imports inside
functions too (a cycle that only exists through a function-level import still couples the two
modules: neither can be understood, tested or moved without the other).

Also: the version is written once (``fusedadapter.__version__``; pyproject.toml reads it).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Set

import pytest

import fusedadapter

ROOT = Path(__file__).resolve().parent.parent


def _package_dirs() -> Dict[str, Path]:
    """{package: folder} for fusedadapter and its sub-packages living elsewhere in the tree, as the
    installed package maps them (pyproject's package-dir: kernels/ and csrc/ install under fusedadapter)."""
    dirs = {"fusedadapter": Path(fusedadapter.__file__).resolve().parent}
    for sub in ("fusedadapter.kernels", "fusedadapter.csrc"):
        spec = importlib.util.find_spec(sub)
        assert spec is not None and spec.submodule_search_locations, f"{sub} is not installed as a package"
        dirs[sub] = Path(list(spec.submodule_search_locations)[0]).resolve()
    return dirs


def package_modules() -> Dict[str, Path]:
    """{dotted module name: source file} of every module of the package."""
    mods: Dict[str, Path] = {}
    for pkg, folder in _package_dirs().items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg] + parts)] = f
    return mods


def import_graph(mods: Dict[str, Path]) -> Dict[str, Set[str]]:
    """module -> the package modules it imports, anywhere in its source (functions included).

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of
    ``pkg``. The implicit import of a module's parent packages is not an edge (it is how Python
    imports any submodule; a parent that imports its children is not a cycle)."""
    graph: Dict[str, Set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    targets.add(sub if sub in mods else target)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _cycle_edges(graph: Dict[str, Set[str]], comp: List[str]) -> str:
    """The import edges inside one cycle (component), for the failure message."""
    members = set(comp)
    return "\n".join(f"  {v} -> {w}" for v in comp for w in sorted(graph[v] & members))


MODULES = package_modules()
GRAPH = import_graph(MODULES)


def test_graph_sees_kernels_and_csrc_under_the_package():
    assert "fusedadapter.kernels.fusion" in MODULES and "fusedadapter.csrc" in MODULES
    assert MODULES["fusedadapter.kernels.fusion"].parent == _package_dirs()["fusedadapter.kernels"]
    assert not any(name.startswith(("kernels", "csrc")) for name in MODULES)


def test_graph_counts_function_level_and_relative_imports(tmp_path):
    files = {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "def f():\n    from .b import g\n    return g\n",
        "pkg/b.py": "import os\nfrom . import c\ng = 1\n",
        "pkg/c.py": "try:\n    from pkg.sub.d import h\nexcept ImportError:\n    pass\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from .. import a\nfrom ..b import g as h\n",
    }
    mods = {}
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        parts = Path(rel).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = import_graph(mods)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.sub.d"},
                     "pkg.sub": set(), "pkg.sub.d": {"pkg.a", "pkg.b"}}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.sub.d"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _assert_acyclic(graph):
    cycles = import_cycles(graph)
    assert not cycles, "import cycles in fusedadapter (function-level imports included):\n" + "\n\n".join(
        _cycle_edges(graph, comp) for comp in cycles)


def test_patching_imports_no_integration_and_no_checkpoint():
    # patching is below the integrations and checkpoint I/O: they register hooks (fusedadapter.registry)
    # and share leaves (compile_cache, adapterhub_format) instead of patching importing them.
    for higher in ("fusedadapter.integrations.adapterhub", "fusedadapter.checkpoint"):
        assert higher not in GRAPH["fusedadapter.patching"]


def test_no_import_cycles():
    _assert_acyclic(GRAPH)


_BOTTOM = ("fusedadapter.errors", "fusedadapter.activations", "fusedadapter.fold", "fusedadapter.reference",
           "fusedadapter.registry", "fusedadapter.compile_cache", "fusedadapter.adapterhub_format",
           "fusedadapter.zero_grads", "fusedadapter.cpu_gemm", "fusedadapter.logit_dropout",
           "fusedadapter.fold_autograd")


def test_bottom_modules_import_nothing_above_them():
    # What everything may depend on stays at the bottom: these import nothing from the package but
    # each other (fold uses fold_autograd and cpu_gemm; the graph stays acyclic, test_no_import_cycles).
    for leaf in _BOTTOM:
        above = GRAPH[leaf] - set(_BOTTOM)
        assert above == set(), f"{leaf} imports {sorted(above)}"
    for leaf in ("fusedadapter.errors", "fusedadapter.activations", "fusedadapter.reference", "fusedadapter.registry",
                 "fusedadapter.compile_cache", "fusedadapter.adapterhub_format", "fusedadapter.zero_grads",
                 "fusedadapter.cpu_gemm", "fusedadapter.logit_dropout"):
        assert GRAPH[leaf] == set(), f"{leaf} imports {sorted(GRAPH[leaf])}"


# Each module imported alone, first, in a fresh interpreter. One subprocess imports torch once and
# forks a child per module (a fresh fusedadapter each time; re-importing in one process would
# redefine the torch.library ops).
_FORK_IMPORTS = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    import torch  # not ours: shared by the children
    names = json.loads(sys.argv[1])
    failed = {}
    for name in names:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                assert not any(m == "fusedadapter" or m.startswith("fusedadapter.") for m in sys.modules)
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                code = 2 if exc.name in ("triton",) else 1  # an optional dependency that is absent
                os.write(w, traceback.format_exc().encode())
            except BaseException:
                code = 1
                os.write(w, traceback.format_exc().encode())
            os.close(w)
            os._exit(code)
        os.close(w)
        chunks = []
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == 1 or code < 0:
            failed[name] = b"".join(chunks).decode() or f"exit status {code}"
    print(json.dumps(failed))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_each_module_imports_alone_in_a_fresh_interpreter(tmp_path):
    names = sorted(MODULES)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _FORK_IMPORTS, json.dumps(names)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "modules that fail when imported first and alone:\n" + "\n".join(
        f"--- {name}\n{tb}" for name, tb in failed.items())


def test_version_has_one_source():
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads(text)
    assert "version" not in project["project"] and "version" in project["project"].get("dynamic", [])
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fusedadapter.__version__"}
    assert fusedadapter.__version__ == importlib.metadata.version("fusedadapter"), (
        "the installed metadata disagrees with fusedadapter.__version__: reinstall (pip install -e .)")


def test_every_package_folder_is_in_the_wheel():
    # pyproject lists the packages explicitly (kernels/ and csrc/ are mapped under fusedadapter), so a
    # new sub-package folder must be added there, or the wheel silently lacks it.
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    on_disk = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert on_disk <= listed, f"package folders missing from pyproject's [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert setuptools_cfg["package-dir"] == {"fusedadapter": "fusedadapter", "fusedadapter.kernels": "kernels",
                                             "fusedadapter.csrc": "csrc"}


def test_no_package_module_over_450_lines():
    # issue 14: a newcomer reads the package in an afternoon; kernel sources (kernels/, csrc/) may be longer.
    root = Path(fusedadapter.__file__).parent
    long = {str(p.relative_to(root)): n for p in sorted(root.rglob("*.py"))
            if p.parent.name not in ("kernels", "csrc") and (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"
