"""Checkpoints with orbax: the train state as a nested tree, plus a JSON record, per step.

    <workdir>/checkpoints/<step>/state    step, rng, params/hidden/0/kernel, opt_state/mu/..., ...
    <workdir>/checkpoints/<step>/record   {'step', 'config', 'history', 'checksum'}

orbax alone reads them (`ocp.StandardCheckpointer().restore('<workdir>/checkpoints/938/state')`).
A save cut short is never listed (orbax renames a complete one into place). The record's SHA-256
of the state and itself is checked on every restore: a damaged checkpoint is set aside in
checkpoints_damaged/ and the previous one used; with none left, the run is refused until --fresh.
Saves are asynchronous: listing, the next save, wait() and close() wait for the write and raise its
error (a full disk). A read-only Checkpointer (predict, explore) creates, deletes, moves nothing.
"""

import errno
import glob
import hashlib
import json
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from fmnist_jax import distributed
from fmnist_jax.run import workdir as workdir_lib
from fmnist_jax.errors import UserError


def _names(path) -> tuple[str, ...]:
  names = [str(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', k)))) for k in path]
  return tuple(names[:-1] if names[-1:] == ['value'] else names)  # An nnx Variable's array.


def as_tree(state) -> dict:
  """The state as nested dicts of its arrays, named by its own fields."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return traverse_util.unflatten_dict({_names(path): leaf for path, leaf in leaves})


def from_tree(tree: dict, template):
  """The inverse of as_tree, given a state of the same structure."""
  flat = traverse_util.flatten_dict(tree)
  leaves = [flat[_names(path)] for path, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


def checksum(state, record: dict) -> str:
  """SHA-256 over every array's name, dtype, shape and bytes, and the record without its checksum
  (of each process's first copy of the replicated arrays: all agree)."""
  h = hashlib.sha256()
  for path, value in jax.tree_util.tree_flatten_with_path(state)[0]:
    host = np.asarray(value.addressable_data(0) if isinstance(value, jax.Array) else value)
    h.update(f'{"/".join(_names(path))}|{host.dtype.str}|{host.shape}|'.encode())
    h.update(np.ascontiguousarray(host).tobytes())
  rest = {k: v for k, v in record.items() if k != 'checksum'}
  h.update(json.dumps(rest, sort_keys=True).encode())
  return h.hexdigest()


def _check_room(directory: str, state) -> None:
  """Raises ENOSPC before a save that cannot fit (the arrays, a tenth more and 1 MiB): a write of
  orbax's that fails midway leaves its other threads printing tracebacks."""
  need = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) * 1.1 + 2**20
  info = os.statvfs(directory)
  if info.f_bavail * info.f_frsize < need:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)


def _remove_partial(directory: str) -> None:
  """Deletes orbax's temporary folders of a save that failed (process 0)."""
  if jax.process_index() == 0:
    for path in glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*')):
      shutil.rmtree(path, ignore_errors=True)


class NoUsableCheckpoint(UserError):
  """Checkpoints exist (or did) but none can be restored: never silently start over on them."""


def _warn(message: str) -> None:
  print(f'warning: {message}', file=sys.stderr, flush=True)


class Checkpointer:
  """Saves and restores (TrainState, record) pairs in <workdir>/checkpoints."""

  def __init__(self, workdir: str, max_to_keep: int = 2, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = workdir_lib.path(self.workdir, workdir_lib.CHECKPOINTS)
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        # Created by the first save, not here: a run stopped before its first step writes nothing.
        read_only=read_only, create=False, max_to_keep=None if read_only else max_to_keep,
        enable_async_checkpointing=not read_only, cleanup_tmp_directories=not read_only)
    for attempt in range(3):
      try:
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=('state', 'record'))
        break
      except FileNotFoundError:  # Read-only: a step listed, then deleted by the training beside.
        if not read_only or attempt == 2:
          raise

  def save(self, state, record: dict) -> None:
    """Starts saving: the arrays are copied to the host now and written in the background."""
    self.wait()  # The previous save's room is taken before this one's is measured.
    os.makedirs(self.directory, exist_ok=True)
    _check_room(self.directory, state)
    record = dict(record, checksum=checksum(state, record))
    self._manager.save(int(record['step']), force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(as_tree(state)), record=ocp.args.JsonSave(record)))

  def wait(self) -> None:
    """Returns when the last save is on disk, or raises its error (no partial checkpoint left)."""
    if not self.read_only:
      try:
        self._manager.wait_until_finished()
      except BaseException:
        _remove_partial(self.directory)
        raise

  def steps(self) -> list[int]:
    """Complete checkpoints, newest first."""
    self.wait()
    return sorted(self._manager.all_steps(), reverse=True)

  def latest_step(self) -> int | None:
    return next(iter(self.steps()), None)

  def newest_record(self) -> dict | None:
    """The newest record that reads as one (arrays not read), or None."""
    for step in self.steps():
      try:
        record = self._manager.restore(step, args=ocp.args.Composite(
            record=ocp.args.JsonRestore()))['record']
      except Exception:  # pylint: disable=broad-except  (damaged: restore() reports it)
        continue
      if isinstance(record, dict) and isinstance(record.get('config'), dict):
        return record
    return None

  def _restore(self, step: int, template) -> tuple[Any, dict]:
    abstract = as_tree(jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    state, record = from_tree(restored['state'], template), restored['record']
    if not isinstance(record, dict) or record.get('checksum') != checksum(state, record):
      raise ValueError('checksum mismatch')
    return state, record

  def restore(self, template) -> tuple[Any, dict] | None:
    """(state, record) of the newest checkpoint that restores and matches its checksum; None
    when there is none (and none was ever set aside as damaged).

    Raises:
      NoUsableCheckpoint: checkpoints exist, or were set aside, but none is usable.
    """
    damaged, notes = [], []  # Notes are told only when an earlier checkpoint is used.
    for step in self.steps():
      try:
        state, record = self._restore(step, template)
      except Exception as e:  # pylint: disable=broad-except
        if self.read_only and not os.path.isdir(os.path.join(self.directory, str(step))):
          continue  # Deleted by the training writing here (max_to_keep): not damage.
        reason = str(e) if isinstance(e, ValueError) and len(str(e)) < 40 else type(e).__name__
        notes.append(f'checkpoint {step} in {self.directory} is damaged or incomplete '
                     f'({reason}); using an earlier one.')
        damaged.append(step)
        continue
      for note in notes:
        _warn(note)
      self._set_aside(damaged)
      return state, record
    aside = workdir_lib.path(self.workdir, workdir_lib.DAMAGED)
    if not damaged and not (os.path.isdir(aside) and os.listdir(aside)):
      return None
    self._set_aside(damaged, quiet=True)  # The error below says it all, in one line.
    what = (f'step(s) {", ".join(map(str, sorted(damaged)))} are damaged' if damaged
            else 'its checkpoints were found damaged earlier')
    where = 'left in place (read-only)' if self.read_only else f'set aside in {aside}'
    raise NoUsableCheckpoint(
        f'no checkpoint in {self.directory} can be restored: {what} ({where}). Nothing else was '
        f'changed; {"train" if self.read_only else "run"} with --fresh to start over, or restore '
        'the files from a backup.')

  def _set_aside(self, steps, quiet: bool = False) -> None:
    """Moves damaged checkpoints into checkpoints_damaged/ by one rename each (never half-moved)."""
    if self.read_only or not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        target = workdir_lib.move_aside(self.workdir, os.path.join(self.directory, str(step)),
                                        str(step))
        if not quiet:
          _warn(f'moved damaged checkpoint {step} to {target}.')
    distributed.barrier('set_aside')
    self._manager.reload()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def check_compatible(ckpt: Checkpointer, now: dict) -> None:
  """Raises UserError naming every field where the newest record and the fingerprint `now` differ
  (read from the record alone: an incompatible config never makes a checkpoint look damaged)."""
  record = ckpt.newest_record()
  if record is None:
    return
  saved = record['config']
  diff = [f'{k} (checkpoint {saved.get(k)!r}, now {v!r})' for k, v in now.items()
          if saved.get(k) != v]
  if diff:
    raise UserError(f'the checkpoint in {ckpt.directory} was made with a different setup: '
                    f'{"; ".join(diff)}. Use the same config and devices to resume, another '
                    '--workdir, or --fresh to start over.')
