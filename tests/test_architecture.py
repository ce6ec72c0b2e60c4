"""The plan between the folders, checked on the source: where imports may point, and how they are written.

Rules (docs/architecture.md explains them):

1. A relative import never climbs: one leading dot, meaning "this folder or below", and it must name a
   file or folder that exists there on disk. ``runtime/``, ``kernels/``, ``export/`` and ``train/`` are
   mapped into ``edgevlm.*`` only by the build, so ``from ..errors`` in ``runtime/`` points at a path
   that does not exist in the checkout.
2. Everything outside the importing file's folder is imported absolutely (``edgevlm.…``), and
   everything inside it relatively, so the form of an import says where it goes.
3. Imports run one way, from the layers that compose to the layers they compose (``ALLOWED``).
4. Nothing rewires the import system: no ``sys.path`` edits, no ``sys.modules`` deletions, no
   assignments to a package's ``__path__``, in the package or the bench scripts.

Each rule is a function over source text, so the tests also show it catching a bad example.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> import name: the `wheel.packages` table of pyproject.toml (test_folders_match_pyproject checks it).
FOLDERS = {"edgevlm": "edgevlm", "runtime": "edgevlm.runtime", "kernels": "edgevlm.kernels",
           "export": "edgevlm.export", "train": "edgevlm.train"}

# Module prefix -> layer. The longest matching prefix wins; "edgevlm" alone is the public facade.
LAYERS = {
    "edgevlm.config": "core", "edgevlm.errors": "core", "edgevlm.presets": "core", "edgevlm.progress": "core",
    "edgevlm.options": "core", "edgevlm._C": "core", "edgevlm.cpu_features": "core", "edgevlm.file_lock": "core",
    "edgevlm.kernels": "kernels",
    "edgevlm.runtime": "runtime",
    "edgevlm.scenes": "scenes", "edgevlm.scene_video": "scenes",
    "edgevlm.export": "export",
    "edgevlm.loading": "loading",
    "edgevlm.perf": "perf",
    "edgevlm.train": "train",
    "edgevlm.cli_args": "cli_args",
    "edgevlm.serving": "serving",
    "edgevlm.serving.protocol": "protocol",
    "edgevlm.client": "client",
    "edgevlm.streams": "streams",
    "edgevlm.cli": "cli",
    "edgevlm": "facade",
}
# Which layers each layer may import (besides itself). Lower layers never reach up: kernels know
# nothing of models, the runtime nothing of export or training, and only the CLI sees everything.
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "runtime": {"core", "kernels"},
    "scenes": {"core", "runtime"},
    "export": {"core", "kernels", "runtime", "scenes", "facade"},
    "loading": {"core", "kernels", "runtime", "export", "facade"},
    "facade": {"core", "runtime", "loading"},
    "perf": {"core", "kernels", "runtime", "loading", "facade"},
    "cli_args": {"core"},
    "protocol": {"core"},
    "client": {"core", "runtime", "protocol"},
    "streams": {"core", "runtime", "client", "protocol"},
    "serving": {"core", "runtime", "export", "loading", "facade", "cli_args", "protocol", "client"},
    "train": {"core", "kernels", "runtime", "scenes", "perf", "cli_args", "facade"},
    "cli": {"core", "kernels", "runtime", "scenes", "export", "loading", "perf", "train", "cli_args", "facade",
            "serving", "protocol", "client"},
}


def _matches(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def layer_of(mod: str) -> str | None:
    best = max((p for p in LAYERS if _matches(mod, p)), key=len, default=None)
    return None if best is None else LAYERS[best]


def folder_of(mod: str) -> PurePosixPath | None:
    """Where the checkout keeps module ``mod`` (a ``.py`` stem or a package folder), or None if not ours."""
    best = max((p for p in FOLDERS.values() if _matches(mod, p)), key=len, default=None)
    if best is None:
        return None
    top = next(folder for folder, name in FOLDERS.items() if name == best)
    rest = mod[len(best):].lstrip(".")
    return PurePosixPath(top, *rest.split(".")) if rest else PurePosixPath(top)


@dataclass(frozen=True)
class Source:
    path: PurePosixPath  # relative to the checkout, e.g. runtime/readers/gguf_reader.py
    text: str

    @property
    def module(self) -> str:
        parts = list(self.path.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        return ".".join([FOLDERS[parts[0]], *parts[1:]])

    @property
    def package(self) -> str:
        return self.module if self.path.name == "__init__.py" else self.module.rpartition(".")[0]


@dataclass(frozen=True)
class Import:
    line: int
    written: str  # as in the source: ".quant", "edgevlm.errors", "."
    target: str  # absolute module name
    names: tuple[str, ...]


def imports(src: Source) -> list[Import]:
    """Every import of ``src`` (deferred ones inside functions too), resolved to absolute names."""
    out = []
    for node in ast.walk(ast.parse(src.text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = src.package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = tuple(a.name for a in node.names)
            out.append(Import(node.lineno, "." * node.level + (node.module or ""), target, names))
        elif isinstance(node, ast.Import):
            out += [Import(node.lineno, a.name, a.name, ()) for a in node.names]
    return out


def _exists(folder: PurePosixPath) -> bool:
    return (ROOT / folder).is_dir() or (ROOT / folder).with_suffix(".py").is_file()


def form_problems(src: Source) -> list[str]:
    """Rules 1 and 2 for one file."""
    here = src.path.parent
    out = []
    for imp in imports(src):
        where = folder_of(imp.target)
        if where is None:
            continue  # another distribution
        inside = here == where or here in where.parents
        if imp.written.startswith("."):
            if imp.written.startswith(".."):
                out.append(f"{src.path}:{imp.line}: 'from {imp.written} import' climbs above {here}/; "
                           f"write 'from {imp.target} import'")
            elif not inside or not _exists(where):
                out.append(f"{src.path}:{imp.line}: 'from {imp.written} import' names {where}, which is not in "
                           f"{here}/ on disk; write 'from {imp.target} import'")
        elif inside and imp.names and imp.target != src.package:  # `import x.y` and `from edgevlm import` may stay
            rel = "." + imp.target[len(src.package) + 1:]
            out.append(f"{src.path}:{imp.line}: 'from {imp.written} import' stays in {here}/; write "
                       f"'from {rel} import'")
    return out


def direction_problems(src: Source) -> list[str]:
    """Rule 3 for one file."""
    mine = layer_of(src.module)
    out = []
    for imp in imports(src):
        targets = [imp.target]
        if imp.names and imp.target == "edgevlm":  # `from edgevlm import _C` imports the module edgevlm._C
            targets = [f"edgevlm.{n}" if layer_of(f"edgevlm.{n}") != "facade" else "edgevlm" for n in imp.names]
        for target in targets:
            theirs = layer_of(target)
            if theirs is None or theirs == mine or theirs in ALLOWED[mine]:
                continue
            out.append(f"{src.path}:{imp.line}: {mine} ({src.module}) imports {theirs} ({target}); "
                       f"{mine} may import {sorted(ALLOWED[mine]) or 'nothing else'}")
    return out


def patching_problems(path: PurePosixPath, text: str) -> list[str]:
    """Rule 4 for one file (package module or bench script)."""
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if owner == "sys.path" and node.func.attr in ("insert", "append", "extend"):
                out.append(f"{path}:{node.lineno}: edits sys.path")
            if owner == "sys.modules" and node.func.attr in ("pop", "clear", "update", "setdefault"):
                out.append(f"{path}:{node.lineno}: edits sys.modules")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) \
            else node.targets if isinstance(node, ast.Delete) else []
        for t in targets:
            text_t = ast.unparse(t)
            if text_t.startswith("sys.modules[") or text_t.endswith(".__path__") or text_t == "sys.path":
                out.append(f"{path}:{node.lineno}: rewrites {text_t}")
    return out


def package_sources() -> list[Source]:
    return [Source(PurePosixPath(p.relative_to(ROOT).as_posix()), p.read_text(encoding="utf-8"))
            for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]


SOURCES = package_sources()


# ---- the rules on this checkout ------------------------------------------------------------------

def test_folders_match_pyproject():
    import tomllib

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]["wheel"]["packages"]
    assert {folder: name.replace("/", ".") for name, folder in table.items()} == FOLDERS
    assert len(SOURCES) > 50, f"the source walk found only {len(SOURCES)} files"


def test_relative_imports_stay_in_their_folder_and_absolute_ones_leave_it():
    problems = [p for src in SOURCES for p in form_problems(src)]
    assert not problems, "\n".join(problems)


def test_imports_run_one_way():
    problems = [p for src in SOURCES for p in direction_problems(src)]
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    assert not [s.module for s in SOURCES if layer_of(s.module) is None]
    assert set(LAYERS.values()) == set(ALLOWED)
    assert all(dep in ALLOWED for deps in ALLOWED.values() for dep in deps)


def test_nothing_rewires_the_import_system():
    files = [(s.path, s.text) for s in SOURCES]
    files += [(PurePosixPath(p.relative_to(ROOT).as_posix()), p.read_text(encoding="utf-8"))
              for p in sorted((ROOT / "bench").glob("*.py"))]
    problems = [p for path, text in files for p in patching_problems(path, text)]
    assert not problems, "\n".join(problems)


# ---- the rules catch what they are meant to catch ------------------------------------------------

def _src(path: str, text: str) -> Source:
    return Source(PurePosixPath(path), text)


@pytest.mark.parametrize("path, text, expect", [
    ("runtime/chat.py", "from ..errors import ConfigError\n", "climbs above runtime/"),
    ("runtime/readers/hf_convnext.py", "from ..vision.convnext import ConvNeXt\n", "climbs above runtime/readers/"),
    ("edgevlm/__init__.py", "from .runtime import loader\n", "not in edgevlm/ on disk"),
    ("runtime/connectors/sphinx.py", "from edgevlm.runtime.connectors.qformer import QFormer\n",
     "write 'from .qformer import'"),
])
def test_form_rule_flags(path, text, expect):
    problems = form_problems(_src(path, text))
    assert len(problems) == 1 and expect in problems[0], problems


@pytest.mark.parametrize("path, text", [
    ("runtime/chat.py", "from edgevlm.errors import ConfigError\nfrom .tokenizer import Tokenizer\n"),
    ("runtime/loader.py", "from .readers.gguf_reader import read_gguf\nfrom edgevlm.kernels import attention\n"),
    ("runtime/quant/apply.py", "from .formats import Packed\nimport numpy\n"),
])
def test_form_rule_passes(path, text):
    assert form_problems(_src(path, text)) == []


@pytest.mark.parametrize("path, text, expect", [
    ("kernels/int4_gemv.py", "from edgevlm.runtime.quant import Packed\n", "kernels (edgevlm.kernels.int4_gemv) imports runtime"),
    ("export/calibration.py", "def f():\n    from edgevlm.train.data import make_scene\n", "export"),
    ("runtime/loader.py", "from edgevlm.export.api import open_export\n", "runtime (edgevlm.runtime.loader) imports export"),
    ("train/cli.py", "from edgevlm.cli import vision_kwargs\n", "train (edgevlm.train.cli) imports cli"),
    ("runtime/pipeline.py", "import edgevlm\n", "imports facade"),
])
def test_direction_rule_flags(path, text, expect):
    problems = direction_problems(_src(path, text))
    assert len(problems) == 1 and expect in problems[0], problems


def test_direction_rule_reads_from_edgevlm_import_module():
    ok = direction_problems(_src("runtime/quant/cpu_linear.py", "from edgevlm import _C\n"))
    bad = direction_problems(_src("runtime/pipeline.py", "from edgevlm import load\n"))
    assert ok == [] and len(bad) == 1


@pytest.mark.parametrize("text", [
    "import sys\nsys.path.insert(0, 'bench')\n",
    "import sys\ndel sys.modules['edgevlm']\n",
    "import sys\nfor k in list(sys.modules): sys.modules.pop(k)\n",
    "import edgevlm\nedgevlm.__path__ = ['x']\n",
])
def test_patching_rule_flags(text):
    assert patching_problems(PurePosixPath("bench/x.py"), text)
