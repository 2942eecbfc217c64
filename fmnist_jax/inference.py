"""Inference from a trained workdir: load_trained (read-only), predict_probs, and the test set's
confusion_matrix and per_class_table.

Reading never changes the workdir (no folders created, no temporary checkpoints cleaned, nothing
moved), so it is safe beside a training that is writing into the same workdir.
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from fmnist_jax import CLASS_NAMES, NUM_CLASSES
from fmnist_jax.run import checkpoint
from fmnist_jax import steps as steps_lib
from fmnist_jax.run import workdir as workdir_lib
from fmnist_jax.errors import UserError
from fmnist_jax.config import validate_config


def how_to_train(workdir: str) -> str:
  return (f'train one with: python -m fmnist_jax.train --config configs/base.py '
          f'--workdir {workdir}')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config.json, validated like a config given on the command line."""
  path = workdir_lib.path(workdir, workdir_lib.CONFIG)
  fix = f'delete it and {how_to_train(workdir)} (the checkpoints are kept and resumed)'
  saved = workdir_lib.read_json(path, fix)
  try:
    config = ml_collections.ConfigDict(saved)
    validate_config(config)
    return config
  except UserError as e:
    raise workdir_lib.WorkdirError(f'{path} holds a bad value ({e}); {fix}.') from None
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise workdir_lib.WorkdirError(f'{path} is not a config this version can use ({e}); '
                                   f'{fix}.') from None


def load_trained(workdir: str) -> tuple[ml_collections.ConfigDict, Any, Any]:
  """Returns (config, graphdef, params) of the newest good checkpoint in `workdir`, read-only.

  Raises UserError saying how to train when there is no usable trained run.
  """
  workdir_lib.check_local(workdir)
  if not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir} does not exist; {how_to_train(workdir)}.')
  config_path = workdir_lib.path(workdir, workdir_lib.CONFIG)
  if not os.path.isfile(config_path) or not os.path.isdir(
      workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)):
    raise UserError(f'{workdir} holds no trained run ({workdir_lib.CONFIG} or '
                    f'{workdir_lib.CHECKPOINTS}/ missing); {how_to_train(workdir)}.')
  config = load_config(workdir)
  graphdef, template = steps_lib.init_state(config)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    restored = ckpt.restore(template)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f'{workdir} has no checkpoint yet; {how_to_train(workdir)}.')
  return config, graphdef, restored[0].params


def predict_probs(config, graphdef, params, images: np.ndarray,
                  batch_size: int = 1000) -> np.ndarray:
  """Class probabilities [N, 10] for uint8 images [N, 28, 28] (mean over models if several)."""
  probs_fn = jax.jit(make_probs_fn(config, graphdef))
  n = len(images)
  batch_size = min(batch_size, max(n, 1))
  padded = np.concatenate([images, np.zeros((-n % batch_size,) + images.shape[1:], np.uint8)])
  out = [np.asarray(probs_fn(params, padded[i:i + batch_size]))
         for i in range(0, len(padded), batch_size)]
  return np.concatenate(out)[:n]


def make_probs_fn(config, graphdef):
  """probs(params, uint8 images [B, 28, 28]) -> [B, 10]: softmax, averaged over models if several."""
  logits_fn = steps_lib.make_steps(config, graphdef).logits
  if config.num_models > 1:
    logits_fn = jax.vmap(logits_fn, in_axes=(0, None))

  def probs_fn(params, images):
    probs = jax.nn.softmax(logits_fn(params, images), axis=-1)
    return probs.mean(axis=0) if config.num_models > 1 else probs

  return probs_fn


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int = NUM_CLASSES):
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
