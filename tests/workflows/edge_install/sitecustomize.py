"""On PYTHONPATH, this makes a process behave as the base (edge) install does: every module that
only `tessera[pipeline]` installs cannot be imported."""

import sys
from importlib.abc import MetaPathFinder

from tessera.workflows.cli import PIPELINE_MODULES


class _NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PIPELINE_MODULES:
            raise ModuleNotFoundError(f"No module named {name!r} (an edge install)", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
