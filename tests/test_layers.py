"""The package keeps its layers: `lint-imports` passes the contracts in pyproject.toml (layers import downward
only, no cycle between the modules of a package), no module imports another module's private name, and every
import left inside a function says why it is not at module level."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "melora_tune"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield path, ".".join(parts), path.name == "__init__.py"


def _target(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "lint-imports is not installed (it comes with the test extras: pip install -e '.[test]')"
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and "2 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_no_module_imports_another_modules_private_names():
    found = []
    for path, module, is_package in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _target(node, module, is_package)
            if not target.startswith("melora_tune") or target == module:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}.{alias.name}")
    assert not found, "\n".join(found)


def test_every_import_inside_a_function_says_why():
    """A function-level import is for a heavy or optional dependency (or a command's lazy load), never to dodge a
    cycle: each one carries a comment on its line, or on the comment line just above its group of imports."""
    missing = set()
    for path, _, _ in _modules():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):  # a nested function's imports are seen twice: missing is a set
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.col_offset == 0:
                    continue
                if "#" in lines[node.lineno - 1] or "#" in lines[node.end_lineno - 1]:
                    continue
                # a comment line directly above this import or above the contiguous imports it belongs to
                i = node.lineno - 2
                while i >= 0 and lines[i].strip().startswith(("import ", "from ")):
                    i -= 1
                if i >= 0 and lines[i].strip().startswith("#"):
                    continue
                missing.add(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not missing, f"{len(missing)} function-level imports say not why:\n" + "\n".join(sorted(missing))


def test_the_command_line_starts_without_the_heavy_libraries():
    """What keeps the lazy imports honest: building every command's parser (what `melora-tune --help` and every
    one-line refusal pay) loads none of Ray, MLflow, pandas, matplotlib, Optuna, DeepSpeed, transformers or datasets."""
    heavy = ("ray", "mlflow", "pandas", "matplotlib", "optuna", "deepspeed", "transformers", "datasets", "scipy", "sklearn")
    code = ("import sys, melora_tune.cli as c; c.build_parser(); "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"building the CLI loaded: {proc.stdout.strip()}"
