"""Predictions from a trained workdir: the tutorial's figures, a confusion matrix, your images.

    python -m fmnist_jax.predict --workdir workdirs/base            # evaluate the test set
    python -m fmnist_jax.predict --workdir workdirs/base shoe.png   # classify image files
    python -m fmnist_jax.predict --workdir workdirs/base --json *.png

The library functions (load_trained, predict_probs, confusion_matrix, per_class_table) work in a
notebook too; fmnist_jax.plots draws the figures.
"""

import json
import os
import sys

import ml_collections
import numpy as np
from absl import flags

from fmnist_jax import CLASS_NAMES
from fmnist_jax import cli
from fmnist_jax.errors import UserError


def _define_flags():
  """CLI flags, defined only when run as a program (the trainer imports this module too)."""
  flags.DEFINE_string('workdir', 'workdirs/base', 'A workdir written by fmnist_jax.train.')
  flags.DEFINE_bool('json', False, 'Print machine-readable JSON instead of text.')
  flags.DEFINE_bool('figures', True, 'Write the PNG figures (test-set mode).')
  flags.DEFINE_integer('index', 0, 'The test image to show on its own (the tutorial: 0).')


def _how_to_train(workdir):
  return (f'train one with: python -m fmnist_jax.train --config configs/base.py '
          f'--workdir {workdir}')


def load_trained(workdir: str):
  """Returns (config, graphdef, params) of the latest checkpoint in `workdir`.

  Raises UserError saying how to train when there is no usable trained run.
  """
  from fmnist_jax import checkpoint, steps, trainer  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(workdir, trainer.CONFIG)
  if not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir} does not exist; {_how_to_train(workdir)}.')
  if not os.path.isfile(config_path) or not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise UserError(f'{workdir} holds no trained run ({trainer.CONFIG} or checkpoints/ '
                    f'missing); {_how_to_train(workdir)}.')
  try:
    with open(config_path) as f:
      config = ml_collections.ConfigDict(json.load(f))
    graphdef, template = steps.init_state(config)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f'{config_path} is not a config this version can use ({e}); '
                    f'{_how_to_train(workdir)}.') from None
  ckpt = checkpoint.Checkpointer(workdir, config.max_checkpoints_to_keep)
  try:
    restored = ckpt.restore(template)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f'{workdir} has no readable checkpoint; {_how_to_train(workdir)}.')
  return config, graphdef, restored[0].params


def predict_probs(config, graphdef, params, images: np.ndarray, batch_size: int = 1000):
  """Class probabilities [N, 10] for uint8 images [N, 28, 28] (mean over models if several)."""
  import jax  # pylint: disable=g-import-not-at-top
  from fmnist_jax import steps  # pylint: disable=g-import-not-at-top
  logits_fn = steps.make_steps(config, graphdef).logits
  if config.num_models > 1:
    logits_fn = jax.vmap(logits_fn, in_axes=(0, None))

  @jax.jit
  def probs_fn(params, x):
    probs = jax.nn.softmax(logits_fn(params, x), axis=-1)
    return probs.mean(axis=0) if config.num_models > 1 else probs

  n = len(images)
  padded = np.concatenate([images, np.zeros((-n % batch_size,) + images.shape[1:], np.uint8)])
  out = [np.asarray(probs_fn(params, padded[i:i + batch_size]))
         for i in range(0, len(padded), batch_size)]
  return np.concatenate(out)[:n]


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int = 10):
  """matrix[true, predicted] = count."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels, predicted), 1)
  return matrix


def per_class_table(matrix: np.ndarray) -> list[dict]:
  """Per class: precision, recall (the share of its images classified right), accuracy
  (one-vs-rest: this class against all others, over every test image) and support."""
  rows = []
  total = matrix.sum()
  for k, name in enumerate(CLASS_NAMES):
    tp = matrix[k, k]
    predicted_k, support = matrix[:, k].sum(), matrix[k].sum()
    true_negatives = total - predicted_k - support + tp
    rows.append({'class': name, 'precision': float(tp / max(predicted_k, 1)),
                 'recall': float(tp / max(support, 1)),
                 'accuracy': float((tp + true_negatives) / max(total, 1)),
                 'support': int(support)})
  return rows


def evaluate_test_set(workdir: str, index: int = 0, figures: bool = True, as_json=False):
  """The tutorial's second half on the test set: prints, figures, confusion, per-class table."""
  from fmnist_jax import data, plots  # pylint: disable=g-import-not-at-top
  config, graphdef, params = load_trained(workdir)
  test = data.load(config.data)['test']
  if not 0 <= index < len(test['label']):  # Checked before the predictions are computed.
    raise UserError(f'--index={index} is outside the test set (0-{len(test["label"]) - 1}).')
  images, labels = test['image'], test['label']
  probs = predict_probs(config, graphdef, params, images)
  predicted = probs.argmax(axis=1)
  matrix = confusion_matrix(labels, predicted)
  table = per_class_table(matrix)
  accuracy = float((predicted == labels).mean())
  result = {'test_accuracy': accuracy, 'first_prediction': {
      'index': index, 'confidences': probs[index].round(6).tolist(),
      'predicted': int(predicted[index]), 'predicted_class': CLASS_NAMES[predicted[index]],
      'label': int(labels[index]), 'label_class': CLASS_NAMES[labels[index]]},
            'per_class': table, 'confusion_matrix': matrix.tolist()}
  if figures:
    plots.use_headless_backend()
    out = os.path.join(workdir, 'figures')
    result['figures'] = [
        plots.save(plots.prediction(images[index], probs[index], labels[index]), out,
                   f'prediction_{index}'),
        plots.save(plots.prediction(images[12], probs[12], labels[12]), out, 'prediction_12'),
        plots.save(plots.prediction_grid(images, probs, labels), out, 'prediction_grid'),
        plots.save(plots.single_prediction_bars(probs[index], labels[index]), out,
                   'single_prediction'),
        plots.save(plots.confusion_matrix(matrix), out, 'confusion_matrix'),
        plots.save(plots.confident_mistakes(images, probs, labels), out, 'confident_mistakes'),
    ]
    curves = training_curves_figure(workdir)
    if curves:
      result['figures'].append(curves)
  if as_json:
    print(json.dumps(result))
    return result
  first = result['first_prediction']
  print(f'Prediction for test image {index}: {np.array2string(probs[index], precision=4)}')
  print(f'argmax: {first["predicted"]} ({first["predicted_class"]}); true label: '
        f'{first["label"]} ({first["label_class"]})')
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


def training_curves_figure(workdir: str) -> str | None:
  """Saves figures/training_curves.png from metrics.jsonl; None when there is no history."""
  from fmnist_jax import plots, trainer  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, trainer.METRICS)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    history = [json.loads(line) for line in f if line.strip()]
  if not history:
    return None
  plots.use_headless_backend()
  return plots.save(plots.training_curves(history), os.path.join(workdir, 'figures'),
                    'training_curves')


def classify_files(workdir: str, paths: list[str], as_json: bool = False) -> int:
  """Prints the top-3 classes of each image file; returns the number of files that failed."""
  from fmnist_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  config, graphdef, params = load_trained(workdir)
  loaded, failures = {}, []
  for path in paths:
    try:
      loaded[path] = images_lib.load(path)
    except images_lib.ImageFileError as e:
      failures.append(str(e))
      print(f'error: {e}', file=sys.stderr, flush=True)
  results = []
  if loaded:
    probs = predict_probs(config, graphdef, params, np.stack(list(loaded.values())))
    for path, p in zip(loaded, probs):
      top = np.argsort(-p)[:3]
      results.append({'file': path, 'top3': [
          {'class': CLASS_NAMES[k], 'label': int(k), 'probability': float(p[k])} for k in top]})
  if as_json:
    print(json.dumps({'predictions': results, 'errors': failures}))
  else:
    for r in results:
      print(f'{r["file"]}: ' + ', '.join(f'{t["class"]} {100 * t["probability"]:.1f}%'
                                         for t in r['top3']))
  return len(failures)


def main(argv):
  f = flags.FLAGS
  files = argv[1:]
  if files:
    failed = classify_files(f.workdir, files, f.json)
    if failed:
      raise SystemExit(1)
  else:
    evaluate_test_set(f.workdir, f.index, f.figures, f.json)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
