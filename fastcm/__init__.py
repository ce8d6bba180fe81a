"""fastcm: consistency models that are fast, exact and tested."""
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _map_source_kernels():
    # setup.py installs the top-level kernels/ directory as fastcm.kernels (package_dir). When fastcm is imported
    # straight from a source checkout (pytest from the repo root, editable installs), load it from there.
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")) or "fastcm.kernels" in sys.modules:
        return
    init = os.path.join(os.path.dirname(here), "kernels", "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("fastcm.kernels", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastcm.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_map_source_kernels()


def __getattr__(name):
    # fastcm.patch(model) / fastcm.unpatch(model) / fastcm.patched(model) from fastcm/integrations, imported on
    # first use (PEP 562): `import fastcm` stays light and never imports diffusers.
    if name in ("patch", "unpatch", "patched"):
        import importlib

        return getattr(importlib.import_module("fastcm.integrations"), name)
    raise AttributeError(f"module 'fastcm' has no attribute {name!r}")
