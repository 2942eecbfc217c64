"""Compiled programs that survive the process: JAX's persistent cache plus a store of our own.

JAX's persistent compilation cache skips XLA's compilation on a rerun, but not what comes before
it: tracing the Python functions and lowering them to StableHLO, whose hash is the cache key. For
the fused training loop that is about half a second of Python on every run. So the trainer keeps
its own store beside JAX's cache: each compiled program serialized, under a key made of everything
that determines it without tracing (this package's code as loaded, the versions of jax, jaxlib,
flax, optax and numpy, the config fields that reach a program, the devices, JAX's settings and the
arguments' shapes, dtypes and shardings). A rerun loads the program and skips tracing and lowering.
Libraries are known by version only: after editing an installed jax, flax or optax in place, empty
the folder (or use --config.compile_cache_dir='').

Both live in one per-user folder (`config.compile_cache_dir`; 'auto': ~/.cache/fmnist_jax/jax),
JAX's entries at its top, ours in programs/. Entries are written atomically, so runs may share
the folder, and carry a SHA-256 checked before loading; a damaged or unloadable entry is
recompiled and replaced. The store is a cache: any failure to read or write it only costs
compile time, never the run.
"""

import hashlib
import importlib
import json
import os
import pickle
import sys
import time
import types

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from fmnist_jax import workdir as workdir_lib

# Config fields that only steer the host (how long, where, what is written), never a program.
HOST_ONLY_FIELDS = ('num_epochs', 'checkpoint_every_steps', 'max_checkpoints_to_keep', 'fresh',
                    'tensorboard', 'progress', 'compile_cache_dir', 'data', 'distributed')
PROGRAMS = 'programs'  # Our store's subfolder of the cache folder.
NOT_STORABLE = '.not-storable'  # Beside a key whose program JAX cannot serialize.
_VERSIONED = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'ml_dtypes')


class CompileCache:
  """JAX's persistent compilation cache in `directory` ('auto': the per-user cache folder; '':
  off), our program store in its programs/ subfolder, and whether this run's programs came from
  either."""

  def __init__(self, directory: str):
    if directory == 'auto':
      base = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
      directory = os.path.join(base, 'fmnist_jax', 'jax')
    self.directory = os.path.expanduser(directory) if directory else ''
    self.hits = self.requests = 0
    self._listening = False

  @property
  def programs(self) -> str:
    """The program store's folder ('' when unusable: cache off, or a folder others may write,
    whose entries must never be loaded)."""
    if not self.directory:
      return ''
    folder = os.path.join(self.directory, PROGRAMS)
    try:
      os.makedirs(folder, mode=0o700, exist_ok=True)
      info = os.stat(folder)
    except OSError:
      return ''
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
      return ''
    return folder

  def _listen(self, event: str, **kwargs) -> None:
    del kwargs
    if not self._listening:
      return
    if event == '/jax/compilation_cache/cache_hits':
      self.hits += 1
    elif event == '/jax/compilation_cache/compile_requests_use_cache':
      self.requests += 1

  def __enter__(self):
    if self.directory:
      try:
        os.makedirs(self.directory, exist_ok=True)
      except OSError:
        self.directory = ''  # An unusable cache folder only costs compile time.
    if self.directory:
      if getattr(jax.config, 'jax_compilation_cache_dir', None) != self.directory:
        # JAX opens its cache once, in the folder set then: a later run in the same process
        # (a notebook, a test) with another folder makes it open that one.
        jax_cache.reset_cache()
      jax.config.update('jax_compilation_cache_dir', self.directory)
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
      jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
      jax.monitoring.register_event_listener(self._listen)
      self._listening = True
    return self

  def __exit__(self, *exc):
    self._listening = False
    # jax < 0.8 has no unregister_event_listener: there the listener stays, silenced by the flag.
    unregister = getattr(jax.monitoring, 'unregister_event_listener', None)
    if self.directory and unregister:
      unregister(self._listen)

  def hit(self, compiler: 'Compiler') -> bool | None:
    """True when every program came from a cache (our store or JAX's); None with the cache off."""
    if not self.directory:
      return None
    return (self.requests + compiler.loaded > 0 and self.hits == self.requests
            and not compiler.fresh)


# The modules whose code reaches a compiled program (the step functions, the model, the loss,
# and the jit wrappers with their shardings).
_PROGRAM_MODULES = ('fmnist_jax.compilation', 'fmnist_jax.distributed', 'fmnist_jax.metrics',
                    'fmnist_jax.model', 'fmnist_jax.steps', 'fmnist_jax.trainer')


def _code_digest() -> str:
  """SHA-256 of the code that builds the programs: each module's source file, and the bytecode of
  every function and method bound in it now, so that a function replaced at run time (in a
  notebook, or a test patching one) changes every key too."""
  h = hashlib.sha256()
  for name in _PROGRAM_MODULES:
    module = importlib.import_module(name)
    with open(module.__file__, 'rb') as f:
      h.update(name.encode() + b'\0' + f.read())
    for attr, value in sorted(vars(module).items()):
      code = _code_of(value, name)
      if code:
        h.update(f'{attr}:'.encode() + code + b'\n')
  return h.hexdigest()


def _code_of(value, module: str) -> bytes:
  """Bytecode of a function, or of the methods of a class defined in `module`; else b''."""
  value = getattr(value, '__wrapped__', None) or getattr(value, '__func__', None) or getattr(
      value, 'fget', None) or value
  if isinstance(value, types.FunctionType):
    return _bytecode(value.__code__) + repr(value.__defaults__).encode()
  if isinstance(value, type) and value.__module__ == module:
    return b''.join(f'{k}:'.encode() + _code_of(v, module) for k, v in sorted(vars(value).items()))
  return b''


def _bytecode(code: types.CodeType) -> bytes:
  """A code object's instructions, names and constants, nested code included. (Not
  marshal.dumps: its output depends on reference counts, so it changes while a process runs.)"""
  parts = [code.co_code, repr((code.co_names, code.co_varnames, code.co_freevars)).encode()]
  parts += [_bytecode(c) if isinstance(c, types.CodeType) else repr(c).encode()
            for c in code.co_consts]
  return b'\0'.join(parts)


def identity(config, mesh) -> str:
  """What every program of this run depends on besides its arguments, as one digest."""
  versions = {name: getattr(importlib.import_module(name), '__version__', None)
              for name in _VERSIONED}  # Imported: the key must not depend on what was before.
  client = jax.devices()[0].client
  settings = {k: repr(v) for k, v in getattr(jax.config, 'values', {}).items() if 'cache' not in k}
  fields = {k: v for k, v in config.to_dict().items() if k not in HOST_ONLY_FIELDS}
  parts = {
      'code': _code_digest(), 'python': sys.version, 'versions': versions,
      'backend': [client.platform, client.platform_version],
      'devices': [[d.id, d.process_index, d.device_kind, str(d)] for d in jax.devices()],
      'process': [jax.process_index(), jax.process_count()], 'mesh': repr(mesh),
      'settings': settings, 'config': fields,
      'env': {k: os.environ.get(k) for k in ('XLA_FLAGS', 'LIBTPU_INIT_ARGS')}}
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def _describe(value) -> str:
  """An argument as the compiled program sees it: shape, dtype, weak type and sharding for
  arrays (and ShapeDtypeStructs), the value itself for static arguments."""
  if hasattr(value, 'shape') and hasattr(value, 'dtype'):
    return (f'{tuple(value.shape)}|{value.dtype}|{getattr(value, "weak_type", False)}|'
            f'{getattr(value, "sharding", None)!r}')
  return repr(value)


class Compiler:
  """Ahead-of-time compilation with the seconds it takes, kept apart from training time; given
  the run's CompileCache and identity, compiled programs are loaded from and saved to its store
  (single-process runs; a multi-process job compiles, with JAX's cache)."""

  def __init__(self, cache: CompileCache | None = None, run_identity: str = ''):
    self.seconds = 0.0
    self.loaded = self.compiled = self.fresh = 0  # From the store; compiled; of those, fresh.
    use = cache is not None and run_identity and jax.process_count() == 1
    self._store = cache.programs if use else ''
    self._identity = run_identity
    self._cache = {}

  def get(self, key, jitted, *args, **kwargs):
    if key not in self._cache:
      start = time.perf_counter()
      self._cache[key] = self._load_or_compile(key, jitted, args, kwargs)
      self.seconds += time.perf_counter() - start
    return self._cache[key]

  def _path(self, key, args, kwargs) -> str:
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    h = hashlib.sha256(f'{self._identity}\n{key!r}\n{treedef}\n'.encode())
    for leaf in leaves:
      h.update(_describe(leaf).encode() + b'\n')
    return os.path.join(self._store, h.hexdigest() + '.bin')

  def _load_or_compile(self, key, jitted, args, kwargs):
    path = self._path(key, args, kwargs) if self._store else ''
    program = _load(path) if path else None
    if program is not None:
      self.loaded += 1
      return program
    self.compiled += 1
    # Stored unless there is no store, or JAX cannot serialize this program (marked so: from then
    # on it is compiled as usual, with JAX's cache).
    if path and not os.path.exists(path + NOT_STORABLE):
      program = _compile_fresh(jitted, args, kwargs)
      self.fresh += 1
      _save(path, program)
      return program
    return jitted.lower(*args, **kwargs).compile()


def _compile_fresh(jitted, args, kwargs):
  """Compiled by XLA now, not loaded from JAX's cache: a program JAX loaded from its cache is not
  serialized again faithfully (on a CPU it loses its kernels: "Function ... not found" when
  run). The store holds it from now on, so JAX's cache is not needed for it."""
  enabled = getattr(jax.config, 'jax_enable_compilation_cache', True)
  jax_cache.reset_cache()  # JAX checks the setting once, when it opens its cache.
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    return jitted.lower(*args, **kwargs).compile()
  finally:
    jax.config.update('jax_enable_compilation_cache', enabled)
    jax_cache.reset_cache()  # Opened again, as configured, at the next compilation.


def _load(path: str):
  """The program stored at `path`, or None (absent, damaged or not loadable here)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError:
    return None
  digest, blob = data[:32], data[32:]
  try:
    if hashlib.sha256(blob).digest() != digest:
      raise ValueError('checksum mismatch')
    payload, in_tree, out_tree, device_ids = pickle.loads(blob)
    by_id = {d.id: d for d in jax.devices()}
    return serialize_executable.deserialize_and_load(
        payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
  except Exception:  # pylint: disable=broad-except
    try:
      os.unlink(path)  # Recompiled and written again below.
    except OSError:
      pass
    return None


def _device_ids(program) -> list[int]:
  """The devices `program` runs on, in its order. Loading needs them: by default JAX loads a
  program onto every device, and a program compiled for fewer (one without arguments runs on one)
  then fails when called ("Attempted to execute with 8 argument lists when local device count is
  1"). (The attribute `serialize` itself reads the program from.)"""
  return [d.id for d in program._executable._unloaded_executable.device_list]  # pylint: disable=protected-access


def _save(path: str, program) -> None:
  """Stores `program`; where JAX cannot serialize it, marks its key as not storable. (A write
  that fails, a full disk say, is only skipped.)"""
  try:
    try:
      blob = pickle.dumps((*serialize_executable.serialize(program), _device_ids(program)))
    except Exception:  # pylint: disable=broad-except
      workdir_lib.write_atomic(path + NOT_STORABLE, b'')
      return
    workdir_lib.write_atomic(path, hashlib.sha256(blob).digest() + blob)
  except OSError:
    pass
