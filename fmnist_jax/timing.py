"""When this process started, so that a run can report its whole time, imports included."""

import os
import time

_IMPORTED_AT = time.time()


def process_start_time() -> float:
  """When this process started, on the time.time() clock (from /proc on Linux)."""
  try:
    with open('/proc/self/stat') as f:
      ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
    return time.time() - uptime + ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return _IMPORTED_AT
