"""Every package folder is listed in pyproject.toml, so a wheel install ships it (an editable
install would hide a missing one)."""

import tomllib
from conftest import REPO

ROOTS = {"moesim": "moesim", "traces": "moesim.traces", "planners": "moesim.planners", "app": "moesim.app"}


def test_every_package_folder_is_installed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for folder, name in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *rel)))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    for name, folder in config["package-dir"].items():
        assert (REPO / folder).is_dir(), name
