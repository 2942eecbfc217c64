"""explore / predict: figures, the confusion matrix, classifying image files, TensorBoard."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from PIL import Image

from fmnist_jax import CLASS_NAMES, inference, plots
from fmnist_jax.photos import images
from tests.conftest import run_cli


@pytest.fixture(scope='module')
def workdir(trained_workdir):
  return trained_workdir


def _assert_real_png(path, min_size=(200, 150)):
  with Image.open(path) as image:
    assert image.format == 'PNG'
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
    pixels = np.asarray(image.convert('L'), dtype=np.float32)
  assert pixels.std() > 10, f'{path} looks blank'  # Not a single-colour image.


def test_predict_test_set_cli(workdir):
  result = run_cli('fmnist_jax.predict', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr
  assert 'Prediction for test image 0:' in result.stdout and 'argmax:' in result.stdout
  for name in CLASS_NAMES:
    assert name in result.stdout
  figures = {os.path.basename(p) for p in glob.glob(str(workdir / 'figures' / '*.png'))}
  expected = {'prediction_0.png', 'prediction_12.png', 'prediction_grid.png',
              'single_prediction.png', 'confusion_matrix.png', 'confident_mistakes.png',
              'training_curves.png'}
  assert expected <= figures
  _assert_real_png(workdir / 'figures' / 'prediction_grid.png', (1000, 800))
  _assert_real_png(workdir / 'figures' / 'confusion_matrix.png', (1200, 500))
  for name in expected:
    _assert_real_png(workdir / 'figures' / name)


def test_predict_json_agrees_with_summary(workdir):
  result = run_cli('fmnist_jax.predict', f'--workdir={workdir}', '--json', '--nofigures')
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout.strip().splitlines()[-1])
  summary = json.loads((workdir / 'summary.json').read_text())
  assert out['test_accuracy'] == pytest.approx(summary['test_accuracy'], abs=1e-6)
  matrix = np.array(out['confusion_matrix'])
  assert matrix.sum() == 10_000 and (matrix.sum(axis=1) == 1000).all()
  assert np.trace(matrix) / 10_000 == pytest.approx(out['test_accuracy'])
  first = out['first_prediction']
  assert sum(first['confidences']) == pytest.approx(1.0, abs=1e-4)
  assert first['predicted'] == int(np.argmax(first['confidences']))


def test_per_class_table_by_hand():
  matrix = np.zeros((10, 10), np.int64)
  matrix[0, 0], matrix[0, 6], matrix[6, 6], matrix[6, 0] = 8, 2, 5, 5
  table = inference.per_class_table(matrix)
  assert table[0] == {'class': 'T-shirt/top', 'precision': 8 / 13, 'recall': 0.8,
                      'accuracy': 13 / 20, 'support': 10}  # TP 8, TN 5 of 20.
  assert table[6]['precision'] == 5 / 7 and table[6]['recall'] == 0.5
  assert table[6]['accuracy'] == 13 / 20 and table[3]['accuracy'] == 1.0
  np.testing.assert_array_equal(inference.confusion_matrix(np.array([0, 0, 6]), np.array([0, 6, 6])
                                                         )[[0, 0, 6], [0, 6, 6]], [1, 1, 1])


def test_explore_cli(workdir):
  result = run_cli('fmnist_jax.explore', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr
  assert 'train_images.shape: (60000, 28, 28)' in result.stdout
  assert 'test_images.shape: (10000, 28, 28)' in result.stdout
  assert 'pixel values: 0 to 255' in result.stdout
  assert 'Ankle boot     6000   1000' in result.stdout
  for name in ('train_image_first', 'train_image_middle', 'train_image_last', 'train_grid_5x5',
               'training_curves'):
    _assert_real_png(workdir / 'figures' / f'{name}.png')


@pytest.fixture(scope='module')
def picture_files(tmp_path_factory, arrays):
  """Test image 0 as PNG: as is, upscaled 10x, as RGB, and inverted onto a white background."""
  folder = tmp_path_factory.mktemp('pictures')
  original = arrays['test']['image'][0]
  big = Image.fromarray(original).resize((280, 280), Image.Resampling.NEAREST)
  variants = {
      'plain.png': Image.fromarray(original),
      'big.png': big,
      'rgb.jpg.png': big.convert('RGB'),
      'white_background.png': Image.fromarray(255 - original).convert('RGB'),
  }
  paths = []
  for name, picture in variants.items():
    picture.save(folder / name)
    paths.append(str(folder / name))
  return original, paths


def test_image_variants_become_the_original_array(picture_files):
  original, paths = picture_files
  for path in paths:
    if Image.open(path).size == (28, 28):  # Already Fashion-MNIST's form: kept exactly.
      np.testing.assert_array_equal(images.load(path), original, err_msg=path)
    else:  # Trimmed (the dataset's 5% tolerance drops the faintest fringe), resized and
      # sharpened again like the dataset: the same article, not identical pixels.
      out = images.load(path).astype(float)
      assert np.corrcoef(out.ravel(), original.ravel())[0, 1] > 0.9, path
      assert np.abs(out - original).mean() < 16, path


def test_wide_light_photo_is_fitted_and_inverted(tmp_path):
  picture = np.full((60, 120, 3), 240, np.uint8)
  picture[20:40, 40:80] = 10  # A dark 40x20 bar on a light, wide background.
  Image.fromarray(picture).save(tmp_path / 'wide.jpg')
  out = images.load(str(tmp_path / 'wide.jpg'))
  assert out.shape == (28, 28) and out.dtype == np.uint8
  assert out[0, 0] < 30 and out[14, 14] > 200  # Inverted: black background, light object.
  assert out[14].min() > 200  # Trimmed to the bar, which then spans the frame's width...
  assert out[:6].max() < 30 and out[-6:].max() < 30  # ...as 28x14, padded above and below.


def test_classify_files_cli(workdir, picture_files, arrays, tmp_path):
  original, paths = picture_files
  expected = int(inference.load_trained(str(workdir)).probs(original[None]).argmax())
  not_image = tmp_path / 'notes.txt'
  not_image.write_text('not a picture')
  missing = tmp_path / 'missing.png'
  result = run_cli('fmnist_jax.predict', f'--workdir={workdir}', '--json', paths[0],
                   str(not_image), *paths[1:], str(missing))
  assert result.returncode == 1
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 2 and 'Traceback' not in result.stderr
  assert f'{not_image}: not an image file' in errors[0]
  assert f'{missing}: file not found' in errors[1]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert [p['file'] for p in out['predictions']] == paths  # The others were still classified.
  for p in out['predictions']:
    _assert_real_png(p['figure'])  # The picture, the 28x28 input it became, the 10 bars.
    assert p['top3'][0]['label'] == expected
    assert len(p['top3']) == 3
    assert p['top3'][0]['probability'] >= p['top3'][1]['probability'] >= p['top3'][2][
        'probability']
  text = run_cli('fmnist_jax.predict', f'--workdir={workdir}', paths[1])
  assert text.returncode == 0
  assert text.stdout.startswith(f'{paths[1]}: {CLASS_NAMES[expected]} ')


def test_missing_workdir_says_how_to_train(tmp_path):
  result = run_cli('fmnist_jax.predict', f'--workdir={tmp_path / "nothing"}')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'does not exist; train one with: python -m fmnist_jax.train' in result.stderr
  (tmp_path / 'empty').mkdir()
  result = run_cli('fmnist_jax.predict', f'--workdir={tmp_path / "empty"}', 'x.png')
  assert result.returncode == 2 and 'holds no trained run' in result.stderr


def test_tensorboard_has_curves_and_figure(workdir):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'),
                                           size_guidance={'images': 0, 'scalars': 0})
  acc.Reload()
  tags = acc.Tags()
  assert {'loss/train', 'loss/test', 'accuracy/train', 'accuracy/test',
          'steps_per_second'} <= set(tags['scalars'])
  assert acc.Scalars('accuracy/test')[0].value > 0.8
  assert 'predictions' in tags['images']


def test_figure_functions_return_figures(arrays):
  imgs, labels = arrays['test']['image'][:20], arrays['test']['label'][:20]
  probs = np.full((20, 10), 0.05)
  probs[np.arange(20), labels] = 0.55
  probs[3] = np.roll(probs[3], 1)  # One mistake.
  for fig in (plots.prediction(imgs[3], probs[3], labels[3]),
              plots.prediction_grid(imgs, probs, labels),
              plots.single_prediction_bars(probs[0], labels[0]),
              plots.confident_mistakes(imgs, probs, labels),
              plots.image_grid(imgs, labels)):
    assert fig.axes
  bars = plots.prediction(imgs[3], probs[3], labels[3]).axes[1].patches
  colors = [tuple(round(c, 3) for c in b.get_facecolor()[:3]) for b in bars]
  from matplotlib.colors import to_rgb
  assert colors[int(labels[3])] == tuple(round(c, 3) for c in to_rgb(plots.RIGHT))
  assert colors[(int(labels[3]) + 1) % 10] == tuple(round(c, 3) for c in to_rgb(plots.WRONG))


def test_robustness_cli(workdir, tmp_path):
  result = run_cli('fmnist_jax.predict', f'--workdir={workdir}', '--robustness',
                   '--robustness_images=60', '--json', f'--figures_dir={tmp_path}')
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  families = report['families']
  assert {'untouched', 'light_margins', 'jpeg', 'rotated'} <= set(families)
  assert all(f['count'] == 60 and 0 <= f['accuracy'] <= 1 for f in families.values())
  assert report['untouched_accuracy'] == families['untouched']['accuracy'] >= 0.7
  _assert_real_png(report['figure'])


def _checkpoints(workdir):
  folder = workdir / 'checkpoints'
  return sorted(n for n in os.listdir(folder)) if folder.exists() else []


def _newest_checkpoint(workdir) -> int:
  return max((int(n) for n in _checkpoints(workdir) if n.isdigit()), default=-1)


def test_predict_beside_a_running_training(data_dir, tmp_path):
  """predict, run again and again while a training saves checkpoints into the same workdir,
  changes nothing there. The overlap is made, not hoped for: the training is asked for 1000
  epochs, so it runs for as long as the test needs, and predict runs until one of its runs saw a
  checkpoint saved while it read them. Then the training is stopped (SIGTERM) and resumed to the
  end of its epoch: it ends with the bits of a run alone, never stopped."""
  import re
  import signal
  import subprocess
  import sys
  import time
  from tests.conftest import ROOT, restore_state, load_test_config
  args = ['--config', 'configs/test.py', f'--config.data.data_dir={data_dir}',
          '--config.checkpoint_every_steps=40']
  busy = tmp_path / 'busy'
  training = subprocess.Popen([sys.executable, '-m', 'fmnist_jax.train', *args,
                               '--config.num_epochs=1000', f'--workdir={busy}'], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 600  # A hang guard, not a measure of speed.
    while not (busy / 'config.json').exists() or _newest_checkpoint(busy) < 0:
      assert training.poll() is None and time.time() < deadline, training.communicate()[1][-2000:]
      time.sleep(0.05)
    overlapped = 0
    while not overlapped:
      before = _newest_checkpoint(busy)
      result = run_cli('fmnist_jax.predict', f'--workdir={busy}', '--json', '--figures=false')
      assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr[-2000:]
      assert json.loads(result.stdout.strip().splitlines()[-1])['test_accuracy'] > 0.5
      overlapped = _newest_checkpoint(busy) > before
      assert training.poll() is None and time.time() < deadline, training.communicate()[1][-2000:]
    training.send_signal(signal.SIGTERM)
    _, err = training.communicate(timeout=300)
  finally:
    if training.poll() is None:
      training.kill()
      training.communicate()
  assert training.returncode == 130, err[-2000:]
  epochs = -(-int(re.search(r'stopped at step (\d+)', err).group(1)) // 938)
  for workdir in (busy, tmp_path / 'alone'):  # The busy run resumed; the same run alone.
    result = run_cli('fmnist_jax.train', *args, f'--config.num_epochs={epochs}',
                     f'--workdir={workdir}')
    assert result.returncode == 0, result.stderr[-2000:]
  assert not (busy / 'checkpoints_damaged').exists() and not (busy / 'figures').exists()
  assert _checkpoints(busy) == _checkpoints(tmp_path / 'alone')
  config = load_test_config()
  a, _ = restore_state(config, busy)
  b, _ = restore_state(config, tmp_path / 'alone')
  assert int(a.step) == int(b.step) == epochs * 938
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_predict_on_a_read_only_workdir(workdir, tmp_path):
  import subprocess
  ro = tmp_path / 'ro'
  ro.mkdir()
  if subprocess.run(['mount', '--bind', str(workdir), str(ro)], capture_output=True).returncode:
    pytest.skip('needs root to make a read-only bind mount')
  try:
    subprocess.run(['mount', '-o', 'remount,bind,ro', str(ro)], check=True)
    result = run_cli('fmnist_jax.predict', f'--workdir={ro}')
    assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert 'Test accuracy:' in result.stdout
    assert 'note: no figures written' in result.stderr and 'pass --figures_dir' in result.stderr
    result = run_cli('fmnist_jax.predict', f'--workdir={ro}', f'--figures_dir={tmp_path / "f"}')
    assert result.returncode == 0 and (tmp_path / 'f' / 'confusion_matrix.png').exists()
  finally:
    subprocess.run(['umount', str(ro)], check=False)
