"""NATS subject names, all under one configurable prefix (default ``mlxcluster``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Subjects:
    """Every subject the cluster uses. Build one from ``config.nats.subject_prefix``."""

    prefix: str = "mlxcluster"

    @property
    def register(self) -> str:
        """Workers publish :class:`~mlxcluster.protocol.WorkerRegistration` here."""
        return f"{self.prefix}.worker.register"

    @property
    def heartbeat(self) -> str:
        """Workers publish :class:`~mlxcluster.protocol.WorkerHeartbeat` here."""
        return f"{self.prefix}.worker.heartbeat"

    @property
    def deregister(self) -> str:
        """Workers publish :class:`~mlxcluster.protocol.Deregister` here when they leave."""
        return f"{self.prefix}.worker.deregister"

    @property
    def cache(self) -> str:
        """Workers publish :class:`~mlxcluster.protocol.CacheEvent` (prompt-cache prefix digests) here."""
        return f"{self.prefix}.worker.cache"

    @property
    def announce(self) -> str:
        """Controllers publish :class:`~mlxcluster.protocol.Announce`; workers re-register on it."""
        return f"{self.prefix}.cluster.announce"

    @property
    def controller_heartbeat(self) -> str:
        """Controllers publish :class:`~mlxcluster.protocol.ControllerHeartbeat` here (they know each other)."""
        return f"{self.prefix}.cluster.controller"

    def controller_requests(self, controller_id: str) -> str:
        """A controller answers :class:`~mlxcluster.protocol.RequestsQuery` here with its requests."""
        return f"{self.prefix}.cluster.controller.{controller_id}.requests"

    @property
    def worker_settings(self) -> str:
        """Controllers publish :class:`~mlxcluster.protocol.WorkerSettingsChanged` (drain, priority, tags)."""
        return f"{self.prefix}.cluster.worker_settings"

    def group(self, name: str) -> str:
        """A worker group's members publish :class:`~mlxcluster.protocol.GroupHello` here (rendezvous, heartbeat)."""
        return f"{self.prefix}.group.{name}"

    def group_wake(self, name: str) -> str:
        """A worker group's rank 0 publishes :class:`~mlxcluster.protocol.GroupWake` here to end its followers'
        doze (:mod:`~mlxcluster.worker.group_wake`)."""
        return f"{self.prefix}.group.{name}.wake"

    def inference(self, worker_id: str) -> str:
        """A worker's request subject; the request's NATS reply subject receives the stream frames."""
        return f"{self.prefix}.worker.{worker_id}.inference"

    def cancel(self, worker_id: str) -> str:
        """A worker's cancel subject (:class:`~mlxcluster.protocol.Cancel`)."""
        return f"{self.prefix}.worker.{worker_id}.cancel"

    def embed(self, worker_id: str) -> str:
        """A worker's embedding requests (:class:`~mlxcluster.protocol.EmbedRequest`, a request with a reply)."""
        return f"{self.prefix}.worker.{worker_id}.embed"

    def models(self, worker_id: str) -> str:
        """A worker's model commands (:class:`~mlxcluster.protocol.ModelCommand`, a request with a reply)."""
        return f"{self.prefix}.worker.{worker_id}.models"

    def response(self, controller_id: str, request_key: str) -> str:
        """One request's stream subject: the reply subject the worker publishes frames to."""
        return f"{self.prefix}.response.{controller_id}.{request_key}"

    def responses(self, controller_id: str) -> str:
        """Wildcard for every stream of one controller: subscribed once, before any request is sent."""
        return f"{self.prefix}.response.{controller_id}.>"

    def usage(self, key_token: str) -> str:
        """One API key's usage records (the usage stream's subject; ``key_token`` from ``records.token``)."""
        return f"{self.prefix}.usage.{key_token}"

    @property
    def usage_all(self) -> str:
        """Every key's usage records: the subjects of the JetStream usage stream."""
        return f"{self.prefix}.usage.>"

    @property
    def all(self) -> str:
        """Wildcard matching every subject of this cluster (for monitoring)."""
        return f"{self.prefix}.>"
