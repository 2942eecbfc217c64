"""Runs an iterator in a background thread a few items ahead (host chunks while the device
trains)."""

import queue
import threading
from typing import Iterable, Iterator


def background(iterable: Iterable, depth: int = 2) -> Iterator:
  """Yields the items of `iterable`, produced by a daemon thread up to `depth` items ahead; an
  exception in the thread is raised here. Closing the generator stops the thread."""
  items = queue.Queue(maxsize=depth)
  done = object()
  stopped = threading.Event()

  def produce():
    try:
      for item in iterable:
        while not stopped.is_set():
          try:
            items.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stopped.is_set():
          return
    except BaseException as e:  # pylint: disable=broad-except
      items.put(e)
      return
    items.put(done)

  threading.Thread(target=produce, daemon=True).start()
  try:
    while True:
      item = items.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stopped.set()
