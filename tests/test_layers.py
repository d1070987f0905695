"""The package's layers point down (import-linter's contracts in pyproject.toml), and no module imports another
package's private names."""
import ast
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert lint, "import-linter is part of the test dependencies (pip install -e '.[test]')"
    r = subprocess.run([lint, "--config", os.path.join(ROOT, "pyproject.toml")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_no_private_names_cross_packages():
    offences = []
    package_root = os.path.join(ROOT, "megactx")
    for folder, _, files in os.walk(package_root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            here = os.path.relpath(folder, ROOT).replace(os.sep, ".")
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megactx"):
                    source_package = node.module.rsplit(".", 1)[0] if node.module.count(".") else node.module
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    if private and source_package != here:
                        offences.append(f"{path}: {node.module} {private}")
    assert not offences, offences


def test_attention_and_server_do_not_import_upward():
    """The issue's own wording: attention imports no engine, server or command; the server no command."""
    for package, forbidden in (("attention", ("megactx.engine", "megactx.server", "megactx.commands")),
                               ("server", ("megactx.commands",))):
        for folder, _, files in os.walk(os.path.join(ROOT, "megactx", package)):
            for name in files:
                if name.endswith(".py"):
                    text = open(os.path.join(folder, name)).read()
                    assert not any(f"from {f}" in text or f"import {f}" in text for f in forbidden), (folder, name)
