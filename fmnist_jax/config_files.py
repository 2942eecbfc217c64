"""Config files (configs/*.py) loaded by path, the way `--config configs/base.py` loads them.

The files are not a Python package: a package named `configs` would collide with any other
project's. A config file may build on another with `config_files.load('base.py', relative_to=
__file__)`.
"""

import hashlib
import importlib.util
import os

import ml_collections

from fmnist_jax.errors import UserError

# The repository's configs/ folder (present in a source checkout and an editable install).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def load(path: str, relative_to: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the config file at `path` (relative to `relative_to`'s folder)."""
  if relative_to is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise UserError(f'config file {path} not found; pass an existing file, e.g. '
                    '--config configs/base.py.')
  # A module name unique per path, so two config files never share an entry in sys.modules.
  name = 'fmnist_jax_config_' + hashlib.sha1(path.encode()).hexdigest()[:12]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base() -> ml_collections.ConfigDict:
  """The defaults: configs/base.py of this checkout."""
  return load(os.path.join(CONFIGS_DIR, 'base.py'))
