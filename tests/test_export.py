"""fmnist_jax.export: every program lowers for TPU and GPU, and the predict export serves."""

import importlib.util
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
  expected = inference.load_trained(str(workdir)).probs(images)
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
      from fmnist_jax import programs, NUM_TEST, NUM_TRAIN
      from fmnist_jax.hardware import lowering
      from fmnist_jax import config as config_lib
      from fmnist_jax.plan import ModelSpec, OptimizerSpec, RunPlan
      config = config_lib.base()
      config.update({overrides!r})
      for n in (1, 8):
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ('data',))
        plan = RunPlan.create(config, NUM_TRAIN, NUM_TEST, n)
        trainer = programs.build(ModelSpec.from_config(config), OptimizerSpec.from_config(config),
                                 plan, mesh)
        exported = lowering.training_programs(config, mesh)
        assert set(exported) == {{'train_chunk', 'shuffle', 'evaluate'}}
        for name, program in exported.items():
          assert program.lower().as_text() == trainer[name].lower().as_text(), name
      print('same')
  ''')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
  assert result.stdout.strip() == 'same', result.stderr[-3000:]


# Compiling with the accelerators' own compilers (--tpu, --gpu) ----------------------------------

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
HAS_CUDA_PLUGIN = any(importlib.util.find_spec(m) for m in ('jax_cuda12_plugin',
                                                             'jax_cuda13_plugin'))


def one_line_error(*flags):
  result = run_cli('fmnist_jax.export', '--config', 'configs/base.py', *flags, '--out',
                   '/nonexistent/never-written')
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize('flag, expected', [
    ('--tpu=v5e:1x1,v7:2x2', "unknown TPU 'v7' in --tpu v7:2x2; choose from v2, v3, v4, v5e, "
                            'v5p, v6e'),
    ('--tpu=v4:2x2', 'v4 needs a shape of 3 sizes, e.g. v4:2x2x2.'),
    ('--gpu=t4,b9000', 'unknown GPU b9000 in --gpu; choose from t4,l4,a100,a100-80,h100,h200.'),
])
def test_bad_target_names_are_one_line_errors(flag, expected):
  assert expected in one_line_error(flag)


def test_a_batch_that_does_not_divide_over_the_chips_is_one_line_error():
  # v3:2x2 is 4 chips of 2 cores each: 8 JAX devices; 36 = 4 x 9 divides over the chips only.
  line = one_line_error('--tpu=v5e:1x1,v3:2x2', '--config.batch_size=36')
  assert line == ('error: batch_size=36 does not divide over the 8 devices of --tpu v3:2x2; use a '
                  'multiple of 8, e.g. --config.batch_size=32 or 40, or fewer devices.')
  assert '8 devices of 8 x h100' in one_line_error('--gpu=t4,h100', '--config.batch_size=36')


@pytest.mark.skipif(HAS_LIBTPU, reason='libtpu is installed here')
def test_no_libtpu_names_the_install():
  line = one_line_error('--tpu=v5e:1x1')
  assert "libtpu, which is not installed here: pip install -e '.[tpu]'." in line


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="jax's CUDA plugin is installed here")
def test_no_cuda_plugin_names_the_install():
  line = one_line_error('--gpu=t4')
  assert "CUDA plugin, which is not installed here: pip install -e '.[cuda12]'." in line


def test_tpu_topologies_parse_into_chips_devices_and_hosts():
  from fmnist_jax.hardware import targets
  colab = targets.parse_tpu('v5e:1x1')
  assert (colab.chips, colab.devices, colab.chips_per_host_bounds) == (1, 1, (1, 1, 1))
  assert colab.info.hbm_bytes == 16 * 2**30 and colab.info.device_kind == 'TPU v5 lite'
  assert targets.parse_tpu('v5e:2x4').chips_per_host_bounds == (2, 4, 1)  # One v5e-8 host.
  assert targets.parse_tpu('v6e:4x4').chips_per_host_bounds == (2, 2, 1)  # 4 hosts.
  v3 = targets.parse_tpu('V3:2x2')
  assert (v3.chips, v3.devices, v3.info.hbm_bytes) == (4, 8, 16 * 2**30)  # 32 GiB per 2 cores.
  assert targets.parse_tpu('v4:2x2x1').chips_per_host_bounds == (2, 2, 1)


def test_gpu_specs_parse_and_match_the_vendors_numbers():
  from fmnist_jax.hardware import targets
  spec = targets.parse_gpu_spec(targets.GPUS['t4'].target_config)
  assert spec['core_count'] == 40 and spec['memory_bandwidth'] == 320e9
  assert spec['major'] == 7 and spec['minor'] == 5 and spec['clock_rate_ghz'] == 1.59
  assert spec['device_description_str'] == 'Tesla T4'
  # Memory CUDA reports, below the nominal sizes: T4 16, L4 24, A100 40/80, H100 80, H200 141 GB.
  nominal = {'t4': 16, 'l4': 24, 'a100': 40, 'a100-80': 80, 'h100': 80, 'h200': 141}
  for name, gpu in targets.GPUS.items():
    assert 0.9 * nominal[name] * 1e9 < gpu.memory_bytes <= nominal[name] * 2**30, name
    assert targets.peak_flops(gpu.device_kind, 'float32'), name  # Every GPU has a roofline.
    assert gpu.spec['platform_name'] == 'CUDA' and gpu.machine_sizes[0] == 1
  h100 = targets.GPUS['h100'].spec
  assert (h100['memory_bandwidth'], h100['major'], h100['core_count']) == (3352320000000, 9, 132)
  assert targets.parse_gpus(['T4', ' h100']) == [targets.GPUS['t4'],
                                                     targets.GPUS['h100']]


def test_roofline_is_the_slower_of_arithmetic_and_memory_traffic():
  from fmnist_jax.hardware import targets
  assert targets.roofline_seconds(2e12, 1e9, 1e12, 1e12) == 2.0  # Compute bound.
  assert targets.roofline_seconds(1e9, 3e12, 1e12, 1e12) == 3.0  # Memory bound.
  # One train step at batch 32 on a T4 in float32: 1.45e7 flops at 8.1 TFLOP/s take 1.8 us,
  # 9.9 MB at 320 GB/s take 31 us: memory bound.
  t4 = targets.GPUS['t4']
  assert targets.gpu_roofline(t4, 'float32', 1.45e7, 9.9e6) == pytest.approx(3.09375e-5)
  assert targets.gpu_roofline(t4, 'float32', 8.1e12, 0) == pytest.approx(1.0)


def test_a_program_that_does_not_fit_is_named_in_one_line():
  from fmnist_jax.hardware import targets
  from fmnist_jax.errors import UserError
  gib = 2**30
  fits = {'topology': 'v5e:1x1', 'program': 'evaluate',
          'memory_bytes': {'argument': gib, 'output': 0, 'temp': 2 * gib, 'generated_code': 0}}
  big = dict(fits, program='train_chunk', memory_bytes=dict(fits['memory_bytes'], temp=16 * gib))
  targets.check_memory([fits], lambda r: 16 * gib)
  with pytest.raises(UserError) as error:
    targets.check_memory([fits, big], lambda r: 16 * gib)
  assert str(error.value) == ('does not fit: train_chunk on v5e:1x1 needs 17.00 GiB of 16.00 GiB '
                              'per device; use a smaller batch_size or eval_batch_size, fewer '
                              'num_models, or more chips.')


def test_table_names_estimates_and_shares_of_memory():
  from fmnist_jax.hardware import compile_check
  from fmnist_jax.hardware import targets
  record = {'topology': 't4', 'devices': 1, 'program': 'train_step', 'compile_seconds': 1.5,
            'memory_bytes': {'argument': 2**28, 'output': 2**28, 'temp': 2**29,
                             'generated_code': 0},
            'flops': 1.45e7, 'bytes_accessed': 9.9e6, 'estimated_seconds': 3.1e-5, 'steps': 1}
  table = compile_check.format_table([record], 'gpu', lambda r: targets.GPUS['t4'].memory_bytes)
  assert 'roofline bounds' in table and 'not measurements' in table
  row = table.splitlines()[2].split()
  assert row[:4] == ['t4', '1', 'train_step', '1.5']
  assert '1,024.0 MiB' in table and '6.78%' in table and '14.50' in table and '31.0 us' in table
  tpu = compile_check.format_table([dict(record, topology='v5e:1x1')], 'tpu',
                                   compile_check.tpu_capacity)
  assert "XLA:TPU's cost model, not measurements" in tpu and '6.25%' in tpu


def test_the_chunks_cost_covers_one_step():
  """steps_covered's claim, checked on the CPU compiler: XLA counts the chunk's loop body, one
  train step and its batch's gather, once."""
  import jax
  from fmnist_jax import model, programs, steps as steps_lib
  from fmnist_jax.hardware import compile_check, lowering
  from fmnist_jax.plan import ModelSpec, OptimizerSpec
  from fmnist_jax import config as config_lib
  config = config_lib.base()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  (chunk_program,) = lowering.dataset_programs(config, mesh, names=('train_chunk',)).values()
  chunk = programs.cost(chunk_program.lower().compile())['flops']
  state, data = chunk_program.args[:2]
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), data)
  spec = ModelSpec.from_config(config)
  one_step = jax.jit(steps_lib.make_steps(spec, OptimizerSpec.from_config(config),
                                          model.graphdef(spec)).train_step)
  step = programs.cost(one_step.lower(state, batch).compile())['flops']
  assert compile_check.steps_covered('train_chunk') == 1
  assert step <= chunk < step * 1.1
  # The analytic count: 2 flops per multiply-add forward and as many for the weights' gradients
  assert step == pytest.approx(4 * 101_770 * config.batch_size, rel=0.15)


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); CI runs "
                    '.ci/compile_check.sh')
def test_xla_tpu_compiles_a_train_step_within_memory():
  from fmnist_jax.hardware import compile_check
  from fmnist_jax.hardware import targets
  from fmnist_jax import config as config_lib
  config = config_lib.base()
  records = compile_check.compile_tpu(config, targets.parse_tpu('v5e:1x1'), names=('train_chunk',
                                                                                'predict'))
  step = records[0]
  assert set(step) == {'topology', 'devices', 'program', 'compile_seconds', 'memory_bytes',
                       'flops', 'bytes_accessed', 'estimated_seconds', 'steps'}
  assert (step['program'], step['devices'], step['steps']) == ('train_chunk', 1, 1)
  assert step['flops'] == pytest.approx(1.3e7, rel=0.2) and 0 < step['estimated_seconds'] < 1e-3
  targets.check_memory(records, compile_check.tpu_capacity)


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax's CUDA plugin (pip install -e "
                    "'.[cuda12]'); CI runs .ci/compile_check.sh")
def test_xla_gpu_compiles_a_train_step_with_a_roofline_bound():
  from fmnist_jax.hardware import compile_check
  from fmnist_jax.hardware import targets
  from fmnist_jax import config as config_lib
  import jax
  from fmnist_jax import programs
  from fmnist_jax.hardware import lowering
  config = config_lib.base()
  (step,) = compile_check.compile_gpu(config, targets.GPUS['t4'], 1, names=('train_chunk',))
  assert step['flops'] == pytest.approx(1.3e7, rel=0.2)
  # Flops and bytes are XLA:CPU's count of the same program, compiled here on its own; the bound
  # is the slower of them at the T4's datasheet numbers (8.1 TFLOP/s float32, 320 GB/s).
  mesh = jax.sharding.Mesh(np.asarray(jax.devices('cpu')[:1]), ('data',))
  (program,) = lowering.dataset_programs(config, mesh, names=('train_chunk',)).values()
  cpu = programs.cost(program.lower().compile())
  assert (step['flops'], step['bytes_accessed']) == (cpu['flops'], cpu['bytes accessed'])
  assert step['estimated_seconds'] == pytest.approx(
      max(cpu['flops'] / 8.1e12, cpu['bytes accessed'] / 320e9))
  targets.check_memory([step], compile_check.gpu_capacity)


@pytest.mark.parametrize('kind', ['tpu', 'gpu'])
def test_estimate_reports_call_their_numbers_estimates(kind):
  """benchmarks/reports/<kind>-estimate.md is what benchmarks.estimate renders from its .json, and
  its title and every table say estimates, not measurements."""
  import json
  from benchmarks import estimate
  with open(os.path.join(estimate.REPORTS, f'{kind}-estimate.json')) as f:
    report = json.load(f)
  with open(os.path.join(estimate.REPORTS, f'{kind}-estimate.md')) as f:
    text = f.read()
  assert text == estimate.markdown(kind, report)
  headings = [line for line in text.splitlines() if line.startswith('#')]
  assert len(headings) == 3 and all('estimates, not measurements' in h for h in headings)
  assert {(r['batch_size'], r['num_models']) for r in report['rows']} == set(estimate.cases())
  assert len(report['rows']) == 2 * len(estimate.cases())
  step = next(r for r in report['rows'] if (r['batch_size'], r['num_models']) == (32, 1))
  assert step['flops'] == pytest.approx(1.45e7, rel=0.05) and step['steps'] == 1


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); CI runs "
                    '.ci/compile_check.sh')
def test_xla_tpu_command_is_quiet_and_writes_its_records(tmp_path):
  """The stream mode's programs (no shuffle, one chunk: a quick compile) for two topologies, with
  libtpu's warnings about the missing TPU held back."""
  result = run_cli('fmnist_jax.export', '--config', 'configs/base.py', '--tpu', 'v5e:1x1,v6e:2x2',
                   '--config.input_mode=stream', '--out', str(tmp_path), env={'XLA_FLAGS': ''})
  assert result.returncode == 0 and result.stderr == '', result.stderr[-3000:]
  import json
  records = json.loads((tmp_path / 'tpu_compile.json').read_text())
  assert [(r['topology'], r['devices'], r['program']) for r in records] == [
      (t, n, p) for t, n in (('v5e:1x1', 1), ('v6e:2x2', 4))
      for p in ('train_chunk', 'train_step', 'evaluate', 'predict', 'finite')]
  assert "XLA:TPU's cost model, not measurements" in result.stdout


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); CI runs "
                    '.ci/compile_check.sh')
def test_xla_tpu_libtpus_words_for_a_held_tpu_are_the_ones_the_notebook_reads():
  """The notebook turns "TPU already in use" into what to do: libtpu's own strings, not a guess."""
  import libtpu
  from fmnist_jax import colab
  with open(os.path.join(os.path.dirname(libtpu.__file__), 'libtpu.so'), 'rb') as f:
    binary = f.read()
  for words, pid in ((b'The TPU is already in use by process with pid ', '4242'),
                     (b'The TPU is already in use by another process', None)):
    assert words in binary, words
    assert colab.TPU_HELD.search(words.decode() + (pid or '')).group(1) == pid


def test_a_gpu_program_that_does_not_fit_is_named_in_one_line():
  """XLA:GPU compiles without the GPU and never refuses: the memory check does, per machine."""
  from fmnist_jax.hardware import compile_check
  from fmnist_jax.hardware import targets
  from fmnist_jax.errors import UserError
  gib = 2**30
  big = {'topology': 'h100', 'devices': 8, 'program': 'predict',
         'memory_bytes': {'argument': 90 * gib, 'output': 0, 'temp': 0, 'generated_code': 0}}
  with pytest.raises(UserError, match=r'^does not fit: predict on 8 x h100 needs 90.00 GiB of '):
    targets.check_memory([big], compile_check.gpu_capacity)


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); CI runs "
                    '.ci/compile_check.sh')
def test_xla_tpu_refusal_of_a_program_too_large_is_one_line(tmp_path):
  """XLA:TPU itself refuses (RESOURCE_EXHAUSTED) a train chunk whose 6-million-unit hidden layer,
  with its Adam state, is 54 GB of arguments for a 16 GB v5e: refused in seconds by both libtpus
  CI compiles with (0.0.42.1, and 0.0.23, which jax[tpu]==0.7.2 pins: Colab's jax), each in its
  own words, told in one line."""
  result = run_cli('fmnist_jax.export', '--config', 'configs/base.py', '--tpu', 'v5e:1x1',
                   '--config.input_mode=stream', '--config.hidden_sizes=(6000000,)', '--out',
                   str(tmp_path), env={'XLA_FLAGS': ''})
  assert result.returncode == 2, result.stderr[-3000:]
  assert re.fullmatch(r'error: does not fit: train_chunk on v5e:1x1: [^\n]*hbm[^\n]*; use a '
                      r'smaller batch_size or eval_batch_size, fewer num_models, or more '
                      r'chips\.\n', result.stderr, re.IGNORECASE), result.stderr[-3000:]
  assert not (tmp_path / 'tpu_compile.json').exists()


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); CI runs "
                    '.ci/compile_check.sh')
@pytest.mark.parametrize('topology', ['v2:2x2', 'v3:2x2', 'v4:2x2x1', 'v4:2x2x2', 'v5e:1x1',
                                      'v5e:2x4', 'v5e:4x4', 'v5p:2x2x1', 'v6e:1x1', 'v6e:2x4'])
def test_xla_tpu_topologies_have_the_devices_jax_shows_on_cloud_tpus(topology):
  """v2 and v3 show each core (v3-8: 8 devices), v4 and v5p one "megacore" per chip (v4-8: 4)."""
  from fmnist_jax.hardware import compile_check
  from fmnist_jax.hardware import targets
  target = targets.parse_tpu(topology)
  devices = compile_check.tpu_devices(target)
  assert len(devices) == target.devices and devices[0].device_kind == target.info.device_kind
