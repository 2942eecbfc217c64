"""Runs a command of this project with one storage error injected where the kernel reports it.

    python -m tests.fail_writes ERRNO NAME_REGEX MODULE [ARGS...]

runs `python -m MODULE ARGS...`, except that os.fsync of a file whose name fully matches
NAME_REGEX raises OSError(ERRNO) (ENOSPC, EDQUOT, EROFS): what a full disk, an exceeded quota or a
filesystem turned read-only report when the data is flushed. Everything above the system call
(the atomic writes, the one-line errors, the exit code) is the project's own code.
"""

import errno
import os
import re
import runpy
import sys


def main() -> None:
  code, pattern, module, *args = sys.argv[1:]
  number = getattr(errno, code)
  name = re.compile(pattern)
  real_fsync = os.fsync

  def fsync(fd):
    target = os.readlink(f'/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}')
    if name.fullmatch(os.path.basename(target)):
      raise OSError(number, os.strerror(number), target)
    return real_fsync(fd)

  os.fsync = fsync
  sys.argv = [module, *args]
  runpy.run_module(module, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
