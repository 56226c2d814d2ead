"""shiv preamble: runs after shiv has unpacked site-packages, before the ``mlxcluster`` entry point.

1. Take the archive itself off ``sys.path``. Everything runs from the unpacked site-packages; left on the
   path, the 70 MB zip is listed by every ``importlib.metadata`` lookup (the version, entry-point plugin
   discovery), which costs ~0.25 s per process, and dual mode's children inherit it through PYTHONPATH.
2. The bundled wheels are CPython-version and platform specific: on another interpreter, say so in one
   line instead of failing later with an ImportError from a native extension.
"""

import os
import sys

_archive = os.path.realpath(globals().get("archive") or sys.argv[0])
sys.path[:] = [entry for entry in sys.path if not entry or os.path.realpath(entry) != _archive]

from mlxcluster.buildinfo import mismatch, read_build_info  # noqa: E402  (after the sys.path fix)

_info = read_build_info()
_problem = mismatch(_info) if _info else None
if _problem:
    print(f"error: {_problem}", file=sys.stderr)
    sys.exit(2)
