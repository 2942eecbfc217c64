"""Predictions from a trained workdir: the tutorial's figures, a confusion matrix, your images.

    python -m fmnist_jax.predict --workdir workdirs/base            # evaluate the test set
    python -m fmnist_jax.predict --workdir workdirs/base shoe.png   # classify image files
    python -m fmnist_jax.predict --workdir workdirs/base --json *.png
    python -m fmnist_jax.predict --workdir workdirs/base --robustness   # photos made from tests

Only the command line lives here (a notebook calls fmnist_jax.inference and fmnist_jax.plots).
The workdir's training files are never changed: checkpoints are opened read-only.
"""

if __name__ == '__main__':  # The command's first instruction: Ctrl-C and SIGTERM are caught.
  from fmnist_jax.run import signals
  signals.install()
# pylint: disable=g-import-not-at-top,wrong-import-position

import json
import os
import re
import sys

import numpy as np
from absl import flags

from fmnist_jax import CLASS_NAMES
from fmnist_jax import cli
from fmnist_jax import data
from fmnist_jax.photos import images as images_lib
from fmnist_jax.run import workdir as workdir_lib
from fmnist_jax.errors import UserError

_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/base', 'A workdir written by fmnist_jax.train.')
_JSON = flags.DEFINE_bool('json', False, 'Print machine-readable JSON instead of text.')
_FIGURES = flags.DEFINE_bool('figures', True, 'Write the PNG figures.')
_FIGURES_DIR = flags.DEFINE_string('figures_dir', None,
                                   'Where figures go; default: <workdir>/figures.')
_INDEX = flags.DEFINE_integer('index', 0, 'The test image to show on its own (the tutorial: 0).')
_ROBUSTNESS = flags.DEFINE_bool('robustness', False,
                                'Measure accuracy on test images turned into photos, per family.')
_ROBUSTNESS_IMAGES = flags.DEFINE_integer('robustness_images', 300,
                                          'Test images per family for --robustness.', lower_bound=1)


def evaluate_test_set(workdir: str, index: int = 0, figures_dir: str | None = '',
                      as_json: bool = False) -> dict:
  """The tutorial's second half on the test set: prints, figures, confusion, per-class table.
  `figures_dir`: '' = <workdir>/figures, None = no figures (the same in the other reports)."""
  from fmnist_jax import inference  # pylint: disable=g-import-not-at-top  (JAX)
  trained = _load(workdir)
  config = trained.config
  test = data.load(config.data)['test']
  if not 0 <= index < len(test['label']):  # Checked before the predictions are computed.
    raise UserError(f'--index={index} is outside the test set (0-{len(test["label"]) - 1}).')
  images, labels = test['image'], test['label']
  probs = trained.probs(images)
  predicted = probs.argmax(axis=1)
  matrix = inference.confusion_matrix(labels, predicted)
  table = inference.per_class_table(matrix)
  accuracy = float((predicted == labels).mean())
  first = {'index': index, 'confidences': probs[index].round(6).tolist(),
           'predicted': int(predicted[index]), 'predicted_class': CLASS_NAMES[predicted[index]],
           'label': int(labels[index]), 'label_class': CLASS_NAMES[labels[index]]}
  result = {'test_accuracy': accuracy, 'num_models': config.num_models, 'first_prediction': first,
            'per_class': table, 'confusion_matrix': matrix.tolist()}
  out = workdir_lib.figures_folder(workdir, figures_dir)
  if out:
    from fmnist_jax import plots  # pylint: disable=g-import-not-at-top  (matplotlib)
    figures = {
        f'prediction_{index}': plots.prediction(images[index], probs[index], labels[index]),
        'prediction_12': plots.prediction(images[12], probs[12], labels[12]),
        'prediction_grid': plots.prediction_grid(images, probs, labels),
        'single_prediction': plots.single_prediction_bars(probs[index], labels[index]),
        'confusion_matrix': plots.confusion_matrix(matrix),
        'confident_mistakes': plots.confident_mistakes(images, probs, labels)}
    result['figures'] = [plots.save(fig, out, name) for name, fig in figures.items()]
    curves = plots.training_curves_figure(workdir, out)
    if curves:
      result['figures'].append(curves)
  if as_json:
    print(json.dumps(result))
    return result
  print(f'Prediction for test image {index}: {np.array2string(probs[index], precision=4)}')
  print(f'argmax: {first["predicted"]} ({first["predicted_class"]}); true label: '
        f'{first["label"]} ({first["label_class"]})')
  if config.num_models > 1:
    print(f'Test accuracy of the ensemble of {config.num_models} models (mean of their '
          f'probabilities): {accuracy:.4f}\n')
  else:
    print(f'Test accuracy: {accuracy:.4f}\n')
  print(f'{"class":12s} {"precision":>9s} {"recall":>9s} {"accuracy":>9s} {"support":>8s}')
  for row in table:
    print(f'{row["class"]:12s} {row["precision"]:9.4f} {row["recall"]:9.4f} '
          f'{row["accuracy"]:9.4f} {row["support"]:8d}')
  print('(recall: share of the class\'s images classified right; accuracy: one-vs-rest over all '
        'test images)')
  for path in result.get('figures', []):
    print(f'wrote {path}')
  return result


def classify_files(workdir: str, paths: list[str], as_json: bool = False,
                   figures_dir: str | None = '') -> int:
  """Prints the top-3 classes of each image file and draws what the model saw; returns the number
  of files that failed (each told in one line, the others still classified)."""
  trained = _load(workdir)
  loaded, failures = images_lib.load_all(paths, images_lib.load_with_original)
  for failure in failures:
    print(f'error: {_one_line(failure)}', file=sys.stderr, flush=True)
  results = []
  if loaded:
    probs = trained.probs(np.stack([converted for _, (_, converted) in loaded]))
    out = workdir_lib.figures_folder(workdir, figures_dir)
    if out:
      from fmnist_jax import plots  # pylint: disable=g-import-not-at-top  (matplotlib)
    for k, ((path, (original, converted)), p) in enumerate(zip(loaded, probs)):
      top = np.argsort(-p)[:3]
      result = {'file': path, 'top3': [
          {'class': CLASS_NAMES[c], 'label': int(c), 'probability': float(p[c])} for c in top]}
      if out:
        name = re.sub(r'[^\w.-]+', '_', os.path.basename(path))[:60]
        result['figure'] = plots.save(
            plots.file_prediction(original, converted, p, title=_one_line(path)), out,
            f'file_{k}_{name}')
      results.append(result)
  if as_json:
    print(json.dumps({'predictions': results, 'errors': failures}))
  else:
    for r in results:
      figure = f'  (figure: {r["figure"]})' if 'figure' in r else ''
      print(f'{_one_line(r["file"])}: ' + ', '.join(
          f'{t["class"]} {100 * t["probability"]:.1f}%' for t in r['top3']) + _one_line(figure))
  return len(failures)


def robustness_report(workdir: str, num_images: int = 300, figures_dir: str | None = '',
                      as_json: bool = False) -> dict:
  """Accuracy on test images turned into photos, per family, beside the untouched accuracy."""
  from fmnist_jax.photos import robustness  # pylint: disable=g-import-not-at-top
  trained = _load(workdir)
  test = data.load(trained.config.data)['test']
  results = robustness.evaluate(trained.probs, test['image'], test['label'],
                                n_per_family=num_images)
  report = {'families': results, 'untouched_accuracy': results['untouched']['accuracy']}
  out = workdir_lib.figures_folder(workdir, figures_dir)
  if out:
    from fmnist_jax import plots  # pylint: disable=g-import-not-at-top  (matplotlib)
    report['figure'] = plots.save(plots.robustness(results), out, 'robustness')
  if as_json:
    print(json.dumps(report))
    return report
  untouched = report['untouched_accuracy']
  print(f'Test images turned into photos ({num_images} per family), converted as predict '
        'converts your files:')
  print(f'{"family":20s} {"accuracy":>9s} {"vs untouched":>13s}')
  for family, r in results.items():
    print(f'{family:20s} {r["accuracy"]:9.4f} {100 * (r["accuracy"] - untouched):+12.1f}p')
  if 'figure' in report:
    print(f'wrote {report["figure"]}')
  return report


def _load(workdir: str):
  """The trained run, saying on stderr which checkpoint an unfinished run's predictions use."""
  from fmnist_jax import inference  # pylint: disable=g-import-not-at-top  (JAX)
  trained = inference.load_trained(workdir)
  if not trained.finished:
    print(f'note: predicting with {inference.describe(trained, workdir)}.', file=sys.stderr,
          flush=True)
  return trained


def _one_line(text: str) -> str:
  """A file name with newlines or control characters, shown on one line."""
  return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv):
  files = argv[1:]
  figures_dir = (_FIGURES_DIR.value or '') if _FIGURES.value else None
  if _ROBUSTNESS.value:
    robustness_report(_WORKDIR.value, _ROBUSTNESS_IMAGES.value, figures_dir, _JSON.value)
  elif files:
    if classify_files(_WORKDIR.value, files, _JSON.value, figures_dir):
      raise SystemExit(1)
  else:
    evaluate_test_set(_WORKDIR.value, _INDEX.value, figures_dir, _JSON.value)


if __name__ == '__main__':
  cli.run(main)
