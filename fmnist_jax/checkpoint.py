"""Checkpoints with orbax: the whole TrainState plus a JSON record of the run, in <workdir>/checkpoints.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a save cut
short (SIGKILL, power loss) is never listed as a checkpoint. A finalized checkpoint that cannot be
read (a file damaged later) is reported and skipped in favour of the previous one.

The state is stored as a flat {path: array} dict, so restoring needs only the freshly initialised
state as a template, whatever pytree classes (NNX State, optax tuples) it contains.
"""

import os
import shutil
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from fmnist_jax import distributed
from fmnist_jax.errors import UserError

# Config fields a checkpoint must agree on to be resumed (num_epochs may grow, outputs may change).
COMPATIBLE_FIELDS = ('model', 'hidden_sizes', 'num_classes', 'optimizer', 'learning_rate', 'b1',
                     'b2', 'eps', 'batch_size', 'seed', 'input_mode', 'compute_dtype',
                     'num_models', 'learning_rates')


def fingerprint(config) -> dict[str, Any]:
  """The config fields that make a checkpoint resumable, as JSON-friendly values."""
  return {name: list(config[name]) if isinstance(config[name], (tuple, list)) else config[name]
          for name in COMPATIBLE_FIELDS}


def _flatten(state) -> dict[str, jax.Array]:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


class Checkpointer:
  """Saves and restores (TrainState, record) pairs; the record is a JSON dict."""

  def __init__(self, workdir: str, max_to_keep: int, fresh: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if fresh and os.path.isdir(self.directory) and jax.process_index() == 0:
      shutil.rmtree(self.directory)
    if fresh:
      distributed.barrier('fresh')  # Nobody opens the folder while process 0 deletes it.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True),
        item_names=('state', 'record'))

  def save(self, state, record: dict) -> None:
    step = int(record['step'])
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_flatten(state)), record=ocp.args.JsonSave(record)),
                       force=True)
    self._manager.wait_until_finished()

  def latest_record(self) -> dict | None:
    """The record of the newest readable checkpoint (no arrays restored), or None."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self._manager.restore(step, args=ocp.args.Composite(
            record=ocp.args.JsonRestore()))['record']
      except Exception:  # pylint: disable=broad-except
        continue
    return None

  def restore(self, template) -> tuple[Any, dict] | None:
    """The newest checkpoint that restores cleanly into `template`'s structure and shardings.

    Returns (state, record), or None when there is no checkpoint. Damaged checkpoints are
    reported on stderr and skipped.
    """
    flat_template = _flatten(template)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                for k, v in flat_template.items()}
    treedef = jax.tree_util.tree_structure(template)
    damaged = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
        flat = restored['state']
        if set(flat) != set(abstract):
          raise ValueError('different state layout')
      except Exception as e:  # pylint: disable=broad-except
        print(f'warning: checkpoint {step} in {self.directory} is damaged or incomplete '
              f'({type(e).__name__}); trying an earlier one.', file=sys.stderr, flush=True)
        damaged.append(step)
        continue
      self._set_aside(damaged)
      state = jax.tree_util.tree_unflatten(treedef, [flat[k] for k in flat_template])
      return state, restored['record']
    return None

  def _set_aside(self, steps) -> None:
    """Moves damaged checkpoints to checkpoints_damaged/ (kept for inspection, out of the way
    of the steps the resumed run will save again)."""
    if not steps or jax.process_index() != 0:
      distributed.barrier('set_aside')
      return
    aside = os.path.join(os.path.dirname(self.directory), 'checkpoints_damaged')
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, f'{step}-{int(time.time())}')
      shutil.move(os.path.join(self.directory, str(step)), target)
      print(f'warning: moved damaged checkpoint {step} to {target}.', file=sys.stderr,
            flush=True)
    self._manager.reload()
    distributed.barrier('set_aside')

  def check_compatible(self, record: dict, config) -> None:
    """Raises UserError naming every field where the checkpoint and the config differ."""
    saved = record.get('config', {})
    now = fingerprint(config)
    diff = [f'{k} (checkpoint {saved.get(k)!r}, config {now[k]!r})'
            for k in COMPATIBLE_FIELDS if saved.get(k) != now[k]]
    if diff:
      raise UserError(f'the checkpoint in {self.directory} was made with a different config: '
                      f'{"; ".join(diff)}. Use the same config to resume, another --workdir, '
                      'or --config.fresh=True to start over.')

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def close(self) -> None:
    self._manager.close()
