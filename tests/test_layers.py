"""The package layering README's Layout section declares, checked on the source: no module imports a package
above its own (module-level and function-level imports alike, read with ``ast``), and the name tables that the
config layer reads from higher packages import no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedgap"

# Bottom up; a module may import its own package, and packages of lower layers only. The first two layers are the
# leaf utilities (the root package and errors; atomic files and output-path checks, seeding, progress bars,
# process tuning, the callback base class), importable from everywhere.
LAYERS: list[set[str]] = [
    {"fedgap", "errors"},  # the version and the user-facing error types
    {"files", "seeding", "progress", "runtime", "callbacks"},
    {"fl"},  # the math: objectives, server update, norm policies; no engine, no I/O
    {"config"},
    {"data", "models", "track"},
    {"engines", "preflight"},
    {"experiment"},  # the round loop and its callbacks
    {"runs"},  # the run executor and cache, sweeps
    {"diagnose"},  # the doctor
    {"report", "export"},
    {"cli"},
    {"__main__"},  # python -m fedgap
]
# Torch-free name tables of higher packages that the config layer reads to validate names (``engine.name``,
# ``model.name``, ``model.groups``): reading them imports no engine, model code or torch (checked below).
NAME_TABLES = {"fedgap.engines.names", "fedgap.models.registry", "fedgap.models.spec"}


def layer_of(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def package_of(module: str) -> str:
    """'fedgap.fl.client' -> 'fl'; 'fedgap' -> 'fedgap'; 'fedgap.errors' -> 'errors'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fedgap"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every fedgap import in a file, at any depth (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "fedgap"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "fedgap":
            if node.module == "fedgap":  # from fedgap import seeding, __version__: each name is a module or the root
                found += [(node.lineno, f"fedgap.{a.name}" if (SRC / f"{a.name}.py").exists() or
                           (SRC / a.name).is_dir() else "fedgap") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def test_every_package_is_in_exactly_one_layer():
    packages = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    declared = [name for layer in LAYERS for name in layer]
    assert sorted(declared) == sorted(set(declared)), "a package is declared twice"
    assert packages | {"fedgap"} == set(declared), "README's Layout section and LAYERS must name every package"


def test_no_module_imports_a_package_above_its_own():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = "fedgap" if rel.name == "__init__.py" and len(rel.parts) == 1 else rel.parts[0].removesuffix(".py")
        for line, module in imports(path):
            target = package_of(module)
            if target == own or module in NAME_TABLES and own == "config":
                continue
            if layer_of(target) >= layer_of(own):
                wrong.append(f"{rel}:{line} ({own}) imports {module} ({target})")
    assert not wrong, "imports against the declared layering:\n" + "\n".join(wrong)


def test_the_layering_test_sees_function_level_imports(tmp_path):
    """The checker itself: an import inside a function body counts."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fedgap.cli import main\n    import fedgap.diagnose.doctor\n")
    assert imports(module) == [(2, "fedgap.cli"), (3, "fedgap.diagnose.doctor")]


def test_the_name_tables_and_the_config_schema_import_no_engine_or_model_code():
    code = ("import sys; import " + ", ".join(sorted(NAME_TABLES)) + "; t = 'torch' in sys.modules; "
            "import fedgap.config; "
            "print(t, sorted(m for m in sys.modules if m.startswith(('fedgap.engines.', 'fedgap.models.', "
            "'fedgap.data'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    torch_loaded, loaded = done.stdout.strip().split(" ", 1)
    assert torch_loaded == "False"  # the name tables alone never load torch
    assert set(eval(loaded)) <= NAME_TABLES  # config loads the name tables, and no engine, model or data code
