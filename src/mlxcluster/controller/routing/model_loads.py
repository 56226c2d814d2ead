"""Loading models on workers: on demand for a request, or by an operator's command.

One load per model at a time on this controller: requests that arrive while a model loads wait for that load
(and the worker itself never loads one model twice at once, whichever controllers ask). The load goes where
:func:`~mlxcluster.controller.routing.model_placement.place` says; once the worker answers, the registry
knows the model is there before the worker's next heartbeat.
"""

from __future__ import annotations

import asyncio
import logging

from mlxcluster.bus import Bus, BusError
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.routing.model_placement import Placement, place
from mlxcluster.controller.routing.registry import WorkerRegistry
from mlxcluster.protocol import ModelCommand, ModelCommandResult

log = logging.getLogger(__name__)


class ModelLoader:
    """Sends model commands to workers; single-flight loads on demand.

    :param timeout_s: the longest wait for a worker's answer to a command (a load may download the model).
    """

    def __init__(self, *, bus: Bus, registry: WorkerRegistry, timeout_s: float) -> None:
        self.bus = bus
        self.registry = registry
        self.timeout_s = timeout_s
        self.loads_started = 0
        """Loads this controller asked for (on demand and by command)."""
        self._loading: dict[str, asyncio.Task[str]] = {}

    async def ensure_loaded(self, model: str) -> str:
        """A worker serving ``model`` once loaded (loading it on the best worker first); the id of the worker.

        :raises ApiError: 503 naming the model and why when it cannot be loaded anywhere.
        """
        task = self._loading.get(model)
        if task is None:
            task = asyncio.ensure_future(self._load_on_demand(model))
            self._loading[model] = task
            task.add_done_callback(lambda _t: self._loading.pop(model, None))
        return await asyncio.shield(task)

    async def _load_on_demand(self, model: str) -> str:
        placement = place(model, self.registry.fleet())
        worker = placement.worker or placement.roomiest()
        if worker is None:
            raise ApiError(
                503,
                f"Model '{model}' is not loaded and no worker can load it: {placement.reason()}",
                type="server_error",
                code="model_unavailable",
            )
        log.info("loading %s on %s for a request (%s)", model, worker, _describe(placement, worker))
        # the request's keep_alive applies when it ends (on the worker), not to the idle model now
        result = await self.command(worker, ModelCommand(action="load", model=model))
        if not result.ok:
            raise ApiError(
                503, f"Model '{model}' failed to load: {result.message}", type="server_error", code="model_load_failed"
            )
        return worker

    async def command(self, worker_id: str, command: ModelCommand) -> ModelCommandResult:
        """Send ``command`` to ``worker_id`` and wait for its answer (a failure is a result with ``ok`` False)."""
        if command.action == "load":
            self.loads_started += 1
        try:
            result = await self.bus.request(
                self.bus.subjects.models(worker_id), command, ModelCommandResult, timeout=self.timeout_s
            )
        except BusError as exc:
            return ModelCommandResult(ok=False, message=f"worker {worker_id} did not answer: {exc}")
        if result.ok and command.action == "load" and result.state is not None:
            self.registry.model_loaded(worker_id, result.state)
        return result

    def placement(self, model: str, *, force: bool = False, worker: str | None = None) -> Placement:
        """Where ``model`` would load now."""
        return place(model, self.registry.fleet(), force=force, worker=worker)


def _describe(placement: Placement, worker: str) -> str:
    chosen = next((c for c in placement.candidates if c.worker == worker), None)
    if chosen is None:
        return "chosen"
    return chosen.reason if chosen.fits else f"the worker decides: as last reported, it {chosen.reason}"
