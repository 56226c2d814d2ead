"""Errors and exit codes shared by the node roles and the CLI; imports nothing of mlxcluster, so anything may use it."""

from __future__ import annotations

CANNOT_START = 2
"""Exit code of a node that could not start because of its settings (a supervisor does not restart it)."""


class NodeError(Exception):
    """A node could not start; the message says why and what to change."""


NODE_FAILED = 3
"""Exit code of a node that stopped serving because a part of it failed (its engine's generation thread died):
a supervisor or service manager restarts it."""


class NodeFailed(Exception):
    """A serving node can no longer serve; the message says why. The process exits with :data:`NODE_FAILED`."""
