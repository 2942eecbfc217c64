"""fmnist_jax.export: every program lowers for TPU and GPU, and the predict export serves."""

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import run_cli

PROGRAMS = ('train_chunk', 'shuffle', 'evaluate')

# A serving process: JAX and NumPy only, no fmnist_jax (checked at the end).
SERVE = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    from jax import export
    with open(sys.argv[1], 'rb') as f:
      exported = export.deserialize(bytearray(f.read()))
    # A multi-device export is called under jit with its inputs sharded over as many devices.
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:exported.nr_devices]), ('data',))
    (sharding,) = exported.in_shardings_jax(mesh)
    probs = jax.jit(exported.call)(jax.device_put(np.load(sys.argv[2]), sharding))
    np.save(sys.argv[3], np.asarray(probs))
    assert not [m for m in sys.modules if m.startswith(('fmnist_jax', 'configs', 'flax'))]
    print(exported.platforms, exported.nr_devices)
''')


def run_export(out, *flags):
  result = run_cli('fmnist_jax.export', '--platforms', 'tpu,cuda', '--devices', '8', '--out',
                   str(out), *flags, env={'XLA_FLAGS': ''})
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def check_programs(out, stdout):
  """One file and one summary line per program, platform and device count."""
  from jax import export
  for devices in (1, 8):
    for platform in ('tpu', 'cuda'):
      for name in PROGRAMS:
        path = out / f'{name}-{platform}-{devices}dev.jaxexport'
        exported = export.deserialize(bytearray(path.read_bytes()))
        assert exported.platforms == (platform,) and exported.nr_devices == devices
        assert re.search(rf'{name} +{platform} +{devices} device\(s\).* '
                         rf'{path.stat().st_size:,} bytes', stdout)
    predict = export.deserialize(bytearray(
        (out / f'predict-cpu_tpu_cuda-{devices}dev.jaxexport').read_bytes()))
    assert predict.platforms == ('cpu', 'tpu', 'cuda') and predict.nr_devices == devices
  assert len(list(out.iterdir())) == 2 * (2 * len(PROGRAMS) + 1)


@pytest.mark.slow
def test_default_config_exports_for_tpu_and_cuda_on_8_devices(tmp_path):
  stdout = run_export(tmp_path, '--config', 'configs/base.py')
  check_programs(tmp_path, stdout)
  # The whole epoch in one chunk, 1,875 batches of 32; the batch split over 8 devices.
  assert 'uint8[1875,32,784]' in stdout and 'uint8[8*k,28,28]' in stdout


@pytest.mark.slow
@pytest.mark.parametrize('override', ['--config.compute_dtype=bfloat16', '--config.num_models=8'])
def test_bf16_and_vmapped_models_export(tmp_path, override):
  stdout = run_export(tmp_path, '--config', 'configs/test.py', override)
  check_programs(tmp_path, stdout)
  from jax import export
  evaluate = export.deserialize(bytearray((tmp_path / 'evaluate-tpu-8dev.jaxexport').read_bytes()))
  models = 8 if 'num_models' in override else None
  assert [a.shape for a in evaluate.out_avals] == [(models,) if models else ()] * 2
  if 'bfloat16' in override:
    assert 'bf16' in evaluate.mlir_module()


def test_bad_platform_is_one_line_error(tmp_path):
  result = run_cli('fmnist_jax.export', '--config', 'configs/test.py', '--platforms', 'tpu,gpu2',
                   '--out', str(tmp_path))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'error: unknown --platforms gpu2; choose from cpu,cuda,rocm,tpu.']


@pytest.mark.slow
def test_predict_export_serves_without_fmnist_jax(config, arrays, tmp_path):
  """A trained model's predict export, loaded in a fresh process, matches predict_probs."""
  from fmnist_jax import inference, loop
  workdir = tmp_path / 'run'
  config.num_epochs = 1
  loop.train_and_evaluate(config, str(workdir))
  out = tmp_path / 'exports'
  run_export(out, '--config', 'configs/test.py', '--workdir', str(workdir))
  images = arrays['test']['image'][:1000]
  np.save(tmp_path / 'images.npy', images)
  cfg, graphdef, params = inference.load_trained(str(workdir))
  expected = inference.predict_probs(cfg, graphdef, params, images)
  for devices in (1, 8):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    result = subprocess.run(
        [sys.executable, '-c', SERVE, str(out / f'predict-cpu_tpu_cuda-{devices}dev.jaxexport'),
         str(tmp_path / 'images.npy'), str(tmp_path / 'probs.npy')],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["('cpu',", "'tpu',", "'cuda')", str(devices)]
    probs = np.load(tmp_path / 'probs.npy')
    assert probs.shape == (1000, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert (probs.argmax(1) == arrays['test']['label'][:1000]).mean() > 0.75


@pytest.mark.parametrize('overrides', [{}, {'compute_dtype': 'bfloat16'}, {'num_models': 8}])
def test_the_export_lowers_what_the_trainer_compiles(overrides):
  """One construction of the programs: the StableHLO the export writes is the trainer's own, for
  the base config, bf16, 8 vmapped models, on 1 and 8 devices (simulated, in a subprocess)."""
  code = textwrap.dedent(f'''
      import jax, numpy as np
      from fmnist_jax import config_files, export, programs, NUM_TEST, NUM_TRAIN
      from fmnist_jax.plan import RunPlan
      config = config_files.base()
      config.update({overrides!r})
      for n in (1, 8):
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ('data',))
        trainer = programs.programs(config, mesh, RunPlan.create(config, NUM_TRAIN, NUM_TEST, n))
        exported = export.training_programs(config, mesh)
        assert set(exported) == {{'train_chunk', 'shuffle', 'evaluate'}}
        for name, program in exported.items():
          assert program.lower().as_text() == trainer[name].lower().as_text(), name
      print('same')
  ''')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert result.stdout.strip() == 'same', result.stderr[-3000:]
