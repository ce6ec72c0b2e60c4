"""The checkout must never stand in for installed packages.

The repository's top level holds ``kernels/``, ``export/``, ``runtime/`` and ``train/``: generic names that
installed distributions also use (transformers imports Hugging Face's ``kernels`` at start-up). They are
installed only as ``edgevlm.kernels`` etc.; if the repository root reached ``sys.path`` — ``python -m
pytest`` or ``python -c`` run from the checkout — they would shadow those packages and break imports deep
inside other libraries. These tests fail when that can happen.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _in_checkout_folder(path: str | os.PathLike | None, name: str) -> bool:
    """Whether ``path`` lies in the checkout's top-level folder ``name`` (the venv, also under the
    checkout, does not count)."""
    if not path:
        return False
    p = Path(path).resolve()
    return p == ROOT / name or (ROOT / name) in p.parents


def _top_level_python_folders() -> list[str]:
    """Folders at the repository root that Python could import as packages if the root were on sys.path."""
    return sorted(p.name for p in ROOT.iterdir()
                  if p.is_dir() and p.name.isidentifier() and any(p.glob("*.py")))


PROBE = """
import importlib.util, json, sys
specs = {}
for name in sys.argv[1:]:
    s = importlib.util.find_spec(name)
    specs[name] = None if s is None else [s.origin, *(s.submodule_search_locations or [])]
print(json.dumps({"path": sys.path, "specs": specs}))
"""


def test_a_fresh_interpreter_does_not_see_the_checkout():
    """A new interpreter of this environment, started from the checkout the way `make test` starts
    pytest (PYTHONSAFEPATH=1): nothing on its sys.path is the checkout root or a folder above it (the
    editable install's .pth would add both; scripts/unshadow_editable.py drops them), and no top-level
    folder name finds the checkout's folder."""
    folders = [n for n in _top_level_python_folders() if n != "edgevlm"]
    assert {"kernels", "export", "runtime", "train"} <= set(folders), folders  # the check sees what it guards
    r = subprocess.run([sys.executable, "-c", PROBE, *folders], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    above = [p for p in got["path"] if p and (Path(p).resolve() == ROOT or Path(p).resolve() in ROOT.parents)]
    assert not above, (f"sys.path holds the checkout or a folder above it: {above}; re-run scripts/setup.sh "
                       f"(scripts/unshadow_editable.py) after an editable install")
    found = {n: places for n, places in got["specs"].items()
             if places and any(_in_checkout_folder(pl, n) for pl in places)}
    assert not found, f"top-level names that import this checkout's folders: {found}"


def test_top_level_folders_resolve_outside_the_checkout():
    """The same in this pytest process (conftest.py also drops the root if `python -m pytest` added it)."""
    for name in _top_level_python_folders():
        if name == "edgevlm":  # the package itself, installed editable from this folder: that is intended
            continue
        if name == "tests":  # pytest's importlib mode registers this folder as module `tests` itself
            continue
        spec = importlib.util.find_spec(name)
        places = [] if spec is None else [spec.origin, *(spec.submodule_search_locations or [])]
        assert not any(_in_checkout_folder(p, name) for p in places), \
            f"`import {name}` resolves to the checkout ({places}) instead of an installed package or nothing"


def test_installed_namesakes_win():
    """Where an installed distribution provides a top-level name that is also a folder here, importing
    that name gives the distribution's module. With transformers 5 installed this includes `kernels`."""
    provided = importlib.metadata.packages_distributions()
    clashes = [n for n in _top_level_python_folders() if n in provided and n != "edgevlm"]
    for name in clashes:
        spec = importlib.util.find_spec(name)
        assert spec is not None and not _in_checkout_folder(spec.origin, name), (name, provided[name], spec)
    if "kernels" in provided:
        assert "kernels" in clashes  # the case that broke the suite is really exercised


def test_test_helper_modules_do_not_clash():
    """tests/ is on sys.path (pytest's `pythonpath`): its module names must not be an installed
    distribution's or the standard library's."""
    provided = importlib.metadata.packages_distributions()
    names = {p.stem for p in TESTS.glob("*.py")}
    clashes = sorted(n for n in names if n in provided or n in sys.stdlib_module_names)
    assert not clashes, f"tests/ modules named like installed or standard modules: {clashes}"


def test_bench_children_do_not_see_the_checkout(monkeypatch):
    """`edgevlm bench` runs each configuration in `python -m edgevlm.perf.latency`; `-m` puts the working
    directory first on the child's sys.path. Started from the checkout, the child must not see the root:
    the command and environment the suite uses are replayed here with a probe instead of the payload."""
    if sys.version_info < (3, 11):
        pytest.skip("PYTHONSAFEPATH needs Python 3.11; on 3.10 run edgevlm bench from outside the checkout")
    from edgevlm.perf import latency

    seen = {}
    real_run = subprocess.run  # latency.subprocess is this same module: keep the real one for the probe

    def fake_run(argv, **kw):
        seen.update(argv=argv, env=kw.get("env"))
        return subprocess.CompletedProcess(argv, 1, "", "probe")

    monkeypatch.setattr(latency.subprocess, "run", fake_run)
    latency._child(latency.BenchConfig(label="probe"), latency.BenchRun(image="x.png"), 5)
    assert seen["argv"][1:3] == ["-m", "edgevlm.perf.latency"], seen["argv"]
    probe = "import json, sys; print(json.dumps(sys.path))"
    r = real_run([seen["argv"][0], "-c", probe], cwd=ROOT, env=seen["env"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    child_path = {Path(p).resolve() if p else ROOT for p in json.loads(r.stdout)}
    assert ROOT not in child_path, f"the bench child would import from the checkout: {sorted(map(str, child_path))}"


def _sys_path_inserts(tree: ast.AST) -> list[ast.Call]:
    calls = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"insert", "append", "extend"}
                and ast.unparse(node.func.value) == "sys.path"):
            calls.append(node)
    return calls


def test_no_code_puts_a_parent_folder_on_sys_path():
    """A script (scripts/, tests/) may put its own folder on sys.path; nothing may add the repository
    root or any other folder above itself. (The package and bench/ edit sys.path not at all:
    test_architecture.py.)"""
    allowed = "str(Path(__file__).resolve().parent)"
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or rel.parts[0] in {"build", "venv"}:
            continue
        for call in _sys_path_inserts(ast.parse(path.read_text(), str(path))):
            args = [ast.unparse(a) for a in call.args]
            if args[-1:] != [allowed]:
                bad.append(f"{rel}:{call.lineno}: {ast.unparse(call)}")
    assert not bad, "sys.path changes outside the script's own folder:\n" + "\n".join(bad)


def test_importing_edgevlm_from_the_checkout_warns():
    """`python -c "import edgevlm"` typed in the checkout puts the root on sys.path; edgevlm says so and
    names the fix, instead of leaving a later `import transformers` to fail inside `kernels`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    code = "import edgevlm"
    plain = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and "RuntimeWarning" in plain.stderr and "PYTHONSAFEPATH" in plain.stderr, plain.stderr
    if sys.version_info >= (3, 11):
        safe = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
        assert safe.returncode == 0 and "RuntimeWarning" not in safe.stderr, safe.stderr
