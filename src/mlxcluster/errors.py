"""Errors and exit codes shared by the node roles and the CLI; imports nothing of mlxcluster, so anything may use it."""

from __future__ import annotations

CANNOT_START = 2
"""Exit code of a node that could not start because of its settings (a supervisor does not restart it)."""


class NodeError(Exception):
    """A node could not start; the message says why and what to change."""
