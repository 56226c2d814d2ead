"""Pluggy hook specifications: the contract between mlxcluster and its plugins (built-in or third-party).

A plugin is a module (or object) with functions decorated by :data:`hookimpl`, named after a spec below and
taking a subset of its arguments. It reaches the cluster through the ``mlxcluster`` entry-point group::

    [project.entry-points.mlxcluster]
    power-of-two = "mlxcluster_power_of_two"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "mlxcluster"

Register = Callable[[str, Callable[..., Any], str], None]
"""The ``register(name, factory, description)`` callback that registration hooks receive."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def mlxcluster_register_balancers(register: Register) -> None:
    """Register load-balancing strategies.

    :param register: call ``register(name, factory, description)`` once per strategy: ``name`` is what
        ``load_balancing.strategy`` names, ``factory()`` (usually the class) returns an object with
        ``pick(workers, request) -> WorkerView | None`` (see :mod:`mlxcluster.api.balancer`),
        ``description`` is one line for ``mlxcluster balancers list``.
    :return: nothing; registration happens through ``register``.
    """


@hookspec
def mlxcluster_register_exporters(register: Register) -> None:
    """Register metrics exporters.

    :param register: call ``register(name, factory, description)`` once per exporter: ``name`` is what
        ``metrics.exporters`` lists, ``factory`` builds the exporter, ``description`` is one line for
        ``mlxcluster exporters list``.
    :return: nothing; registration happens through ``register``.
    """
