"""The program store beside JAX's persistent cache: reruns skip tracing, nothing stale is loaded."""

import ast
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import compilation, trainer
from tests.conftest import ROOT, load_test_config, restore_state


def _compiler(folder, config=None):
  cache = compilation.CompileCache(str(folder))
  config = config or load_test_config()
  return cache, compilation.Compiler(cache, compilation.identity(config, 'mesh'))


def _scale(x, factor):
  return jnp.sin(x) * factor


def _program(compiler, fn=_scale, shape=(8,)):
  jitted = jax.jit(fn, static_argnames='factor')
  return compiler.get('scale', jitted, jnp.ones(shape), factor=3.0)


def test_rerun_loads_the_program_and_gives_the_same_result(tmp_path):
  cache, first = _compiler(tmp_path)
  with cache:
    expected = np.asarray(_program(first)(jnp.arange(8.0)))
  assert (first.compiled, first.loaded) == (1, 0)
  assert len(os.listdir(tmp_path / 'programs')) == 1
  cache, second = _compiler(tmp_path)  # A new run: a new Compiler, the same folder.
  with cache:
    got = np.asarray(_program(second)(jnp.arange(8.0)))
  assert (second.compiled, second.loaded) == (0, 1)
  np.testing.assert_array_equal(got, expected)


def test_anything_that_changes_the_program_changes_the_key(tmp_path):
  cache, compiler = _compiler(tmp_path)
  with cache:
    _program(compiler)
  config = load_test_config()
  config.learning_rate = 0.002  # A field that reaches the programs.
  for make, shape in ((lambda: _compiler(tmp_path, config), (8,)),  # Config.
                      (lambda: _compiler(tmp_path), (9,))):  # Argument shape.
    cache, other = make()
    with cache:
      _program(other, shape=shape)
    assert (other.compiled, other.loaded) == (1, 0)
  config = load_test_config()
  config.num_epochs = 7  # Host-only fields share the programs.
  cache, same = _compiler(tmp_path, config)
  with cache:
    _program(same)
  assert (same.compiled, same.loaded) == (0, 1)


def test_a_function_replaced_at_run_time_is_never_served_stale(tmp_path, monkeypatch):
  cache, compiler = _compiler(tmp_path)
  with cache:
    _program(compiler)
  monkeypatch.setattr(trainer, 'check_finite', lambda *args: None)  # Any function of the package.
  cache, patched = _compiler(tmp_path)
  with cache:
    _program(patched)
  assert (patched.compiled, patched.loaded) == (1, 0)


def test_a_damaged_entry_is_recompiled_and_replaced(tmp_path):
  cache, compiler = _compiler(tmp_path)
  with cache:
    expected = np.asarray(_program(compiler)(jnp.arange(8.0)))
  (entry,) = (tmp_path / 'programs').iterdir()
  data = bytearray(entry.read_bytes())
  data[len(data) // 2] ^= 0x10
  entry.write_bytes(bytes(data))
  cache, again = _compiler(tmp_path)
  with cache:
    got = np.asarray(_program(again)(jnp.arange(8.0)))
  assert (again.compiled, again.loaded) == (1, 0)
  np.testing.assert_array_equal(got, expected)
  cache, third = _compiler(tmp_path)
  with cache:
    _program(third)
  assert third.loaded == 1  # Written again, whole.


def test_a_folder_others_may_write_is_never_loaded_from(tmp_path):
  (tmp_path / 'programs').mkdir(mode=0o777)
  os.chmod(tmp_path / 'programs', 0o777)
  assert compilation.CompileCache(str(tmp_path)).programs == ''
  assert compilation.CompileCache('').programs == ''


def test_training_rerun_loads_every_program_bitwise_the_same(data_dir, tmp_path, monkeypatch):
  """Also when JAX's own cache already holds the programs (earlier tests compiled them)."""
  compilers = []
  monkeypatch.setattr(trainer, 'Compiler', lambda *a: compilers.append(
      compilation.Compiler(*a)) or compilers[-1])
  config = load_test_config()
  config.data.data_dir = data_dir
  config.compile_cache_dir = str(tmp_path / 'cache')
  first = trainer.train_and_evaluate(config, str(tmp_path / 'first'))
  config.checkpoint_every_steps = 300  # Host-only: the same programs.
  second = trainer.train_and_evaluate(config, str(tmp_path / 'second'))
  assert compilers[0].compiled > 0
  assert (compilers[1].compiled, compilers[1].loaded) == (0, compilers[0].compiled)
  assert first['compile_cache_hit'] is False and second['compile_cache_hit'] is True
  assert second['test_loss'] == first['test_loss']
  a, _ = restore_state(config, tmp_path / 'first')
  b, _ = restore_state(config, tmp_path / 'second')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_program_that_cannot_be_stored_is_compiled_as_usual(tmp_path, monkeypatch):
  """Marked once, then compiled with JAX's cache every run, never fresh again."""
  from jax.experimental import serialize_executable

  def refuse(program):
    raise NotImplementedError('serialize_executables with const_args')
  monkeypatch.setattr(serialize_executable, 'serialize', refuse)
  for run in range(2):
    cache, compiler = _compiler(tmp_path)
    with cache:
      np.testing.assert_allclose(_program(compiler)(jnp.zeros(8)), np.zeros(8))
    assert (compiler.compiled, compiler.loaded, compiler.fresh) == (1, 0, 1 - run)
  assert [p.name.endswith('.not-storable') for p in (tmp_path / 'programs').iterdir()] == [True]


_ON_TWO_DEVICES = '''
import sys
import jax, jax.numpy as jnp
from fmnist_jax import compilation
from tests.conftest import load_test_config
assert jax.device_count() == 2
mesh = jax.make_mesh((2,), ('data',))
sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
results = []
for run in range(2):  # The second run loads both programs.
  cache = compilation.CompileCache(sys.argv[1])
  compiler = compilation.Compiler(cache, compilation.identity(load_test_config(), mesh))
  with cache:
    init = compiler.get('init', jax.jit(lambda: jnp.arange(4.0)))  # Compiled for one device.
    double = compiler.get('double', jax.jit(lambda x: 2 * x, out_shardings=sharded),
                          jax.device_put(jnp.zeros(4), sharded))
    results.append((compiler.loaded, init().tolist(), double(init()).tolist()))
print(results)
'''


def test_programs_load_onto_the_devices_they_were_compiled_for(tmp_path):
  """With two devices, a program for one of them (no arguments) and one for both."""
  result = subprocess.run(
      [sys.executable, '-c', _ON_TWO_DEVICES, str(tmp_path)], capture_output=True, text=True,
      cwd=ROOT, env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2'),
      timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  first, second = ast.literal_eval(result.stdout)
  assert first == (0, [0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 4.0, 6.0])
  assert second == (2, first[1], first[2])
