"""Checkpoints with orbax: the whole TrainState plus a JSON record of the run, in <workdir>/checkpoints.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a save cut
short (SIGKILL, power loss) is never listed as a checkpoint. Each record carries a SHA-256 of the
state's bytes and of the record itself, checked on every restore: a checkpoint damaged later (a
flipped bit, a truncated file) is reported, moved to checkpoints_damaged/, and the previous one is
used. A read-only Checkpointer (predict, explore) never creates, deletes or moves anything.

Saves are asynchronous: save() copies the arrays to the host and returns; orbax writes them in a
background thread while the training goes on. Listing, the next save, wait() and close() wait for
the write, so an error (a full disk) is raised there, and nothing is reported as saved before it is.

The state is stored as a flat {path: array} dict, so restoring needs only the freshly initialised
state as a template, whatever pytree classes (NNX State, optax tuples) it contains.
"""

import contextlib
import glob
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fmnist_jax import distributed
from fmnist_jax import workdir as workdir_lib
from fmnist_jax.errors import UserError

# Config fields a checkpoint must agree on to be resumed (num_epochs may grow, outputs may change).
COMPATIBLE_FIELDS = ('model', 'hidden_sizes', 'num_classes', 'optimizer', 'learning_rate', 'b1',
                     'b2', 'eps', 'batch_size', 'seed', 'input_mode', 'compute_dtype',
                     'num_models', 'learning_rates')


LAYOUT = ('devices', 'processes')  # Not config fields: the run's device layout.


def fingerprint(config) -> dict[str, Any]:
  """What a checkpoint must match to be resumed: the config fields above and the device layout
  (another device or process count changes the order of the sums, hence the numbers)."""
  fields = {name: list(config[name]) if isinstance(config[name], (tuple, list)) else config[name]
            for name in COMPATIBLE_FIELDS}
  fields['devices'] = jax.device_count()
  fields['processes'] = jax.process_count()
  return fields


def _flatten(state) -> dict[str, jax.Array]:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def checksum(flat: dict[str, Any], record: dict) -> str:
  """SHA-256 over every array's name, dtype, shape and bytes, and the record without its checksum.

  Arrays are replicated, so each process hashes its own first copy and all agree.
  """
  h = hashlib.sha256()
  for key in sorted(flat):
    value = flat[key]
    host = np.asarray(value.addressable_data(0) if isinstance(value, jax.Array) else value)
    h.update(f'{key}|{host.dtype.str}|{host.shape}|'.encode())
    h.update(np.ascontiguousarray(host).tobytes())
  rest = {k: v for k, v in record.items() if k != 'checksum'}
  h.update(json.dumps(rest, sort_keys=True).encode())
  return h.hexdigest()


def _is_late_tensorstore_callback(unraisable) -> bool:
  """True for the error of a TensorStore write that completes after orbax gave up on a save.

  When one write of a save fails (a full disk), orbax's event loop stops and closes while the
  save's other writes are still in flight; as each completes, TensorStore hands its result to the
  closed loop (`call_soon_threadsafe`), which raises into TensorStore's thread, where it is
  reported as unraisable. The save has already failed and been reported: the write is harmless.
  """
  if unraisable.object is not None or not isinstance(unraisable.exc_value, RuntimeError):
    return False
  if str(unraisable.exc_value) != 'Event loop is closed':
    return False
  frames = [frame.name for frame in traceback.extract_tb(unraisable.exc_traceback)]
  return 'call_soon_threadsafe' in frames


def _quiet_late_tensorstore_callbacks() -> None:
  """Drops exactly those reports (many tracebacks after the one-line disk-full error); any other
  unraisable error still goes to the previous hook. Installed once, chained, idempotent."""
  previous = sys.unraisablehook
  if getattr(previous, 'fmnist_jax_filter', False):
    return

  def hook(unraisable):
    if not _is_late_tensorstore_callback(unraisable):
      previous(unraisable)
  hook.fmnist_jax_filter = True
  sys.unraisablehook = hook


class NoUsableCheckpoint(UserError):
  """Checkpoints exist but none can be restored: never silently start over on top of them."""


class Checkpointer:
  """Saves and restores (TrainState, record) pairs; the record is a JSON dict."""

  def __init__(self, workdir: str, max_to_keep: int = 2, fresh: bool = False,
               read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = workdir_lib.path(self.workdir, workdir_lib.CHECKPOINTS)
    self.read_only = read_only
    if fresh and os.path.isdir(self.directory) and jax.process_index() == 0:
      shutil.rmtree(self.directory)
    if fresh:
      distributed.barrier('fresh')  # Nobody opens the folder while process 0 deletes it.
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             cleanup_tmp_directories=False)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
          cleanup_tmp_directories=True)
      _quiet_late_tensorstore_callbacks()
    self._manager = self._open(options)

  def _open(self, options):
    """The orbax manager. Read-only, it may list a step that the training writing beside it then
    deletes (max_to_keep) before its metadata is read: list again."""
    for attempt in range(5):
      try:
        return ocp.CheckpointManager(self.directory, options=options,
                                     item_names=('state', 'record'))
      except FileNotFoundError:
        if not self.read_only or attempt == 4:
          raise
        time.sleep(0.1 * (attempt + 1))

  def save(self, state, record: dict) -> None:
    """Starts saving: the arrays are copied to the host now, written in the background (the
    training goes on meanwhile); the next save, wait() and close() wait for it."""
    flat = _flatten(state)
    record = dict(record, checksum=checksum(flat, record))
    with self._cleaned_up_on_failure():
      self._manager.save(int(record['step']), args=ocp.args.Composite(
          state=ocp.args.StandardSave(flat), record=ocp.args.JsonSave(record)), force=True)

  def wait(self) -> None:
    """Returns when the last save is complete on disk (raises its error, if it failed)."""
    if not self.read_only:
      with self._cleaned_up_on_failure():
        self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _cleaned_up_on_failure(self):
    try:
      yield
    except BaseException:
      # A full disk must not leave half a checkpoint behind. Writes still in flight may recreate
      # files in the folder just removed (TensorStore creates parent folders): look again.
      self._remove_partial()
      time.sleep(0.2)
      self._remove_partial()
      raise

  def _remove_partial(self) -> None:
    """Deletes orbax's temporary folders of an unfinished save (process 0)."""
    if jax.process_index() == 0:
      for path in glob.glob(os.path.join(self.directory, '*.orbax-checkpoint-tmp*')):
        shutil.rmtree(path, ignore_errors=True)

  def steps(self) -> list[int]:
    """Complete checkpoints, newest first."""
    self.wait()
    return sorted(self._manager.all_steps(), reverse=True)

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[0] if steps else None

  def _record(self, step: int) -> dict:
    record = self._manager.restore(step, args=ocp.args.Composite(
        record=ocp.args.JsonRestore()))['record']
    if not isinstance(record, dict) or not isinstance(record.get('config'), dict):
      raise ValueError('record without a config')
    return record

  def check_compatible(self, config) -> None:
    """Raises UserError naming every field where the newest readable record and `config` differ.

    Checked on the records alone (no arrays), so an incompatible config never makes a good
    checkpoint look damaged.
    """
    for step in self.steps():
      try:
        saved = self._record(step)['config']
      except Exception:  # pylint: disable=broad-except
        continue  # Damaged: restore() reports it.
      now = fingerprint(config)
      # Records written before the device layout was recorded match any layout.
      diff = [f'{k} (checkpoint {saved.get(k)!r}, {"now" if k in LAYOUT else "config"} '
              f'{now[k]!r})' for k in now
              if saved.get(k, now[k] if k in LAYOUT else None) != now[k]]
      if diff:
        raise UserError(f'the checkpoint in {self.directory} was made with a different setup: '
                        f'{"; ".join(diff)}. Use the same config and devices to resume, another '
                        '--workdir, or --config.fresh=True to start over.')
      return

  def restore(self, template) -> tuple[Any, dict] | None:
    """The newest checkpoint that restores cleanly and matches its checksum.

    Returns (state, record), or None when there is no checkpoint. Damaged checkpoints are reported
    on stderr and (unless read-only) moved to checkpoints_damaged/.

    Raises:
      NoUsableCheckpoint: checkpoints exist but none is usable.
    """
    flat_template = _flatten(template)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                for k, v in flat_template.items()}
    treedef = jax.tree_util.tree_structure(template)
    damaged = []
    for attempt in range(3):
      steps = [s for s in self.steps() if s not in damaged]
      for step in steps:
        try:
          restored = self._manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
          flat, record = restored['state'], restored['record']
          if set(flat) != set(abstract):
            raise ValueError('different state layout')
          if not isinstance(record, dict) or record.get('checksum') != checksum(flat, record):
            raise ValueError('checksum mismatch')
        except Exception as e:  # pylint: disable=broad-except
          if self.read_only and not os.path.isdir(os.path.join(self.directory, str(step))):
            continue  # Removed by the training that writes here (max_to_keep); not damage.
          reason = str(e) if isinstance(e, ValueError) and len(str(e)) < 40 else type(e).__name__
          print(f'warning: checkpoint {step} in {self.directory} is damaged or incomplete '
                f'({reason}); trying an earlier one.', file=sys.stderr, flush=True)
          damaged.append(step)
          continue
        self._set_aside(damaged)
        state = jax.tree_util.tree_unflatten(treedef, [flat[k] for k in flat_template])
        return state, record
      if not self.read_only or not steps:
        break
      try:
        self._manager.reload()  # A training may have saved newer ones meanwhile.
      except FileNotFoundError:
        pass  # A step it listed vanished meanwhile; the next attempt lists again.
      time.sleep(0.1 * (attempt + 1))
    if not damaged:
      return None
    moved = self._set_aside(damaged)
    where = f'moved to {moved}' if moved else 'left in place (read-only)'
    raise NoUsableCheckpoint(
        f'no checkpoint in {self.directory} can be restored: step(s) '
        f'{", ".join(map(str, sorted(damaged)))} are damaged ({where}). Nothing was changed '
        'otherwise; run with --config.fresh=True to start over, or restore the files from a '
        'backup.')

  def _set_aside(self, steps) -> str | None:
    """Moves damaged checkpoints to checkpoints_damaged/ (kept for inspection, out of the way
    of the steps the resumed run will save again); returns that folder."""
    if self.read_only or not steps:
      return None
    aside = workdir_lib.path(self.workdir, workdir_lib.DAMAGED)
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f'{step}-{int(time.time())}')
        shutil.move(os.path.join(self.directory, str(step)), target)
        print(f'warning: moved damaged checkpoint {step} to {target}.', file=sys.stderr,
              flush=True)
    distributed.barrier('set_aside')
    self._manager.reload()
    return aside

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()
