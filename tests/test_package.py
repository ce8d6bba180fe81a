"""Packaging: fastcm.kernels resolves, kernels never import fastcm, the console entry point works."""
import ast
import subprocess
import sys
from pathlib import Path

import fastcm

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_subpackage_resolves_to_top_level_dir():
    import fastcm.kernels.pseudo_huber as k

    assert Path(k.__file__).resolve().parent == (ROOT / "kernels").resolve()


def test_kernels_never_import_fastcm():
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(n.split(".")[0] == "fastcm" for n in names), f"{path.name} imports fastcm"


def test_import_outside_repo(tmp_path):
    code = "import fastcm.kernels, fastcm.ops; print(fastcm.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == fastcm.__version__


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "fastcm.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and fastcm.__version__ in out.stdout
