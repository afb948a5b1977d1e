"""The package as pip installs it (not editable): every subpackage is listed."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "localprop").rglob("__init__.py")}
    assert found <= listed, f"subpackages missing from pyproject.toml's packages: {sorted(found - listed)}"
    renamed = {name: ROOT / path for name, path in config.get("package-dir", {}).items()}
    assert all(path.is_dir() for path in renamed.values())
