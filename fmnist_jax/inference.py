"""Inference from a trained workdir: load_trained, class probabilities, the test set's confusion
matrix and per-class table.

Reading never changes the workdir (no folders created, no temporary checkpoints cleaned, nothing
moved), so it is safe beside a training that is writing into the same workdir.
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax import CLASS_NAMES, NUM_CLASSES, NUM_TEST, NUM_TRAIN
from fmnist_jax import distributed
from fmnist_jax import model as model_lib
from fmnist_jax import steps as steps_lib
from fmnist_jax.errors import UserError
from fmnist_jax.plan import ModelSpec, OptimizerSpec, RunPlan
from fmnist_jax.run import checkpoint
from fmnist_jax.run import outputs
from fmnist_jax.run import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained run as read from its workdir: its config, model and parameters, and the step of the
  checkpoint they come from, of the run's `total_steps`."""
  config: Any
  model: ModelSpec
  graphdef: Any
  params: Any
  step: int
  total_steps: int

  @property
  def finished(self) -> bool:
    return self.step >= self.total_steps

  def probs(self, images: np.ndarray) -> np.ndarray:
    """Class probabilities [N, 10] for uint8 images [N, 28, 28]."""
    return predict_probs(self.model, self.graphdef, self.params, images)


def load_trained(workdir: str) -> Trained:
  """The newest good checkpoint in `workdir`, read-only.

  Raises UserError saying how to train when there is no usable trained run.
  """
  workdir_lib.check_local(workdir)
  if not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir} does not exist; {outputs.how_to_train(workdir)}.')
  if not all(os.path.exists(workdir_lib.path(workdir, name))
             for name in (workdir_lib.CONFIG, workdir_lib.CHECKPOINTS)):
    raise UserError(f'{workdir} holds no trained run ({workdir_lib.CONFIG} or '
                    f'{workdir_lib.CHECKPOINTS}/ missing); {outputs.how_to_train(workdir)}.')
  config = outputs.read_config(workdir)
  model = ModelSpec.from_config(config)
  graphdef, template = steps_lib.init_state(model, OptimizerSpec.from_config(config), config.seed)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    restored = ckpt.restore(template)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f'{workdir} has no checkpoint yet; {outputs.how_to_train(workdir)}.')
  total = RunPlan.create(config, NUM_TRAIN, NUM_TEST, 1).total_steps
  return Trained(config, model, graphdef, restored[0].params, int(restored[0].step), total)


def describe(trained: Trained, workdir: str) -> str:
  """'the checkpoint at step 938 of workdirs/base (finished)' or '... (unfinished: 1,000 of
  9,375 steps)': which parameters a prediction uses."""
  state = ('finished' if trained.finished else
           f'unfinished: {trained.step:,} of {trained.total_steps:,} steps')
  return f'the checkpoint at step {trained.step} of {workdir} ({state})'


def predict_probs(model: ModelSpec, graphdef, params, images: np.ndarray,
                  batch_size: int = 1000) -> np.ndarray:
  """Class probabilities [N, 10] for uint8 images [N, 28, 28] (mean over models if several)."""
  if images.dtype != np.uint8:  # Scaled to [0, 1] already, they would be scaled twice.
    raise UserError(f'images are {images.dtype}; give them as uint8 [N, 28, 28], as Fashion-MNIST '
                    'stores them: the model scales them to [0, 1] itself.')
  return distributed.in_batches(jax.jit(make_probs_fn(model, graphdef)), params, images,
                                distributed.make_mesh(jax.local_devices()[:1]),
                                min(batch_size, max(len(images), 1)))


def make_probs_fn(model: ModelSpec, graphdef):
  """probs(params, uint8 images [B, 28, 28]) -> [B, 10]: softmax, mean over models if several."""
  def logits_fn(params, images):
    return model_lib.apply(graphdef, params, images, jnp.dtype(model.compute_dtype))
  if model.num_models > 1:
    logits_fn = jax.vmap(logits_fn, in_axes=(0, None))

  def probs_fn(params, images):
    probs = jax.nn.softmax(logits_fn(params, images), axis=-1)
    return probs.mean(axis=0) if model.num_models > 1 else probs

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
