"""What `make install` ships: every package of the source tree is listed in
setup.cfg (it names them one by one, for the rules directory's mapping). A
package left out installs a guard that fails at import under the unit, as
tests/deploy/test_booted_unit.py found for rome_guard.kernel and
rome_guard.respond.outputs."""

from __future__ import annotations

import configparser
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_package_in_the_tree_is_installed():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    listed = {p.strip() for p in cfg["options"]["packages"].split("\n") if p.strip()}
    found = {
        os.path.relpath(folder, REPO).replace(os.sep, ".")
        for folder, _, files in os.walk(os.path.join(REPO, "rome_guard"))
        if "__init__.py" in files
    }
    assert found - listed == set()
    assert listed - found == {"rome_guard.rules"}  # mapped from ./rules by package_dir
