"""Worker groups find each other over NATS: announce, agree on the members, rank them, write the hostfile.

Every member publishes a :class:`~mlxcluster.protocol.GroupHello` on ``group.<name>`` every
:data:`HELLO_INTERVAL_S` for its whole life, naming its ring address and the instances it hears. The group
forms when a member hears ``size`` members that all hear exactly the same instances; each then ranks
the same set the same way (a pinned ``rank`` first, then member ids), so no leader is needed. A member
not heard from for :data:`FORGET_AFTER_S` is dropped from the set. After forming, the hellos are the
members' heartbeat: :meth:`Rendezvous.watch` reports a member that goes silent or comes back as a new
instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mlxcluster.bus import Bus
from mlxcluster.config import GroupSection
from mlxcluster.protocol import GroupHello, GroupInfo, GroupMember
from mlxcluster.worker.system import hostname

log = logging.getLogger(__name__)

HELLO_INTERVAL_S = 0.25
HOSTFILE_PREFIX = "mlxcluster-group-"
FORGET_AFTER_S = 1.5


class RendezvousError(Exception):
    """The group did not form (timeout, or members that disagree on what the group is)."""


@dataclass
class _Seen:
    hello: GroupHello
    at: float


@dataclass
class Rendezvous:
    """One member's side of the rendezvous and, once formed, of the members' heartbeat."""

    bus: Bus
    settings: GroupSection
    member_id: str
    model: str
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    address: str = ""
    formed: list[GroupHello] | None = None
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _subscription: Subscription | None = None
    _task: asyncio.Task[None] | None = None
    _warned: set[str] = field(default_factory=set)

    @property
    def subject(self) -> str:
        return self.bus.subjects.group(str(self.settings.name))

    async def start(self) -> None:
        """Pick the ring address, subscribe, and start saying hello."""
        host = self.settings.host
        self.address = f"{host}:{self.settings.port or free_port(host)}"
        self._subscription = await self.bus.subscribe(self.subject, GroupHello, self._on_hello)
        self._task = asyncio.create_task(self._hello_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()

    async def form(self, timeout_s: float | None) -> list[GroupHello]:
        """Wait until the group agrees on its members; return them in rank order.

        :param timeout_s: give up with :class:`RendezvousError` after this long (``None``: wait for ever,
            logging who is missing now and then).
        """
        started = time.monotonic()
        last_log = started
        while True:
            members = self._agreed()
            if members is not None:
                self.formed = members
                self._seen_at_formation = {m.member_id: m.instance for m in members}
                return members
            now = time.monotonic()
            if timeout_s is not None and now - started > timeout_s:
                raise RendezvousError(self._missing_text(f"did not form within {timeout_s:.0f} s"))
            if now - last_log > 15:
                log.info("%s", self._missing_text("still waiting"))
                last_log = now
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HELLO_INTERVAL_S):
                    await self._changed.wait()

    def group_info(self, backend: str) -> GroupInfo:
        members = self.formed or []
        return GroupInfo(
            name=str(self.settings.name),
            size=self.settings.size,
            parallel=self.settings.parallel,
            backend=backend,
            members=[
                GroupMember(rank=i, member_id=m.member_id, hostname=m.hostname, address=m.address)
                for i, m in enumerate(members)
            ],
        )

    def write_hostfile(self, directory: str | None = None) -> str:
        """The ring's hostfile (JSON: one list of ``host:port`` per rank); a configured one is used as is."""
        if self.settings.hostfile:
            return str(Path(self.settings.hostfile).expanduser().resolve())
        hosts = [[m.address] for m in self.formed or []]
        handle = tempfile.NamedTemporaryFile(
            "w", prefix=f"{HOSTFILE_PREFIX}{self.settings.name}-", suffix=".json", dir=directory, delete=False
        )
        with handle:
            json.dump(hosts, handle)
        return handle.name

    async def watch(self, stall_timeout_s: float, on_lost: Callable[[str], None]) -> None:
        """After forming: call ``on_lost(reason)`` once when a member goes silent or restarts."""
        assert self.formed is not None
        while True:
            await asyncio.sleep(HELLO_INTERVAL_S)
            reason = self.lost_member(stall_timeout_s)
            if reason is not None:
                on_lost(reason)
                return

    def lost_member(self, silent_after_s: float) -> str | None:
        """A member of the formed group that is silent for ``silent_after_s`` or restarted, described; else None."""
        now = time.monotonic()
        silent: list[tuple[float, str]] = []  # the longest silence first: others may be silent because of it
        restarted: list[str] = []
        for rank, member in enumerate(self.formed or []):
            if member.member_id == self.member_id:
                continue
            seen = self._seen.get(member.member_id)
            label = f"member {member.member_id} (rank {rank}, {member.address})"
            if seen is None or now - seen.at > silent_after_s:
                quiet = float("inf") if seen is None else now - seen.at
                ago = "never heard" if seen is None else f"silent for {quiet:.1f} s"
                silent.append((quiet, f"{label} is gone ({ago})"))
            elif seen.hello.instance != member.instance:
                restarted.append(f"{label} restarted")
        if silent:
            return max(silent)[1]
        return restarted[0] if restarted else None

    # --- internals ------------------------------------------------------------------------------

    def _current(self) -> dict[str, GroupHello]:
        horizon = time.monotonic() - FORGET_AFTER_S
        return {mid: s.hello for mid, s in self._seen.items() if s.at >= horizon}

    def _agreed(self) -> list[GroupHello] | None:
        current = self._current()
        if len(current) != self.settings.size or self.member_id not in current:
            return None
        instances = sorted(h.instance for h in current.values())
        if any(sorted(h.sees) != instances for h in current.values()):
            return None
        return sorted(current.values(), key=_rank_key)

    def _missing_text(self, what: str) -> str:
        current = self._current()
        heard = ", ".join(sorted(current)) or "nobody"
        return (
            f"worker group {self.settings.name!r} {what}: {len(current)} of {self.settings.size} members "
            f"heard ({heard}); start the others with the same --group and --group-size, or check that "
            f"they reach the same NATS server"
        )

    async def _on_hello(self, hello: GroupHello, _msg: Msg) -> None:
        problem = self._incompatible(hello)
        if problem is not None:
            if hello.instance not in self._warned:
                self._warned.add(hello.instance)
                log.error("ignoring group member %s: %s", hello.member_id, problem)
            return
        previous = self._seen.get(hello.member_id)
        self._seen[hello.member_id] = _Seen(hello, time.monotonic())
        if previous is None or previous.hello.instance != hello.instance or previous.hello.sees != hello.sees:
            self._changed.set()

    def _incompatible(self, hello: GroupHello) -> str | None:
        s = self.settings
        for what, theirs, ours in (
            ("size", hello.size, s.size),
            ("parallel", hello.parallel, s.parallel),
            ("backend", hello.backend, s.backend),
            ("model", hello.model, self.model),
        ):
            if theirs != ours:
                return f"it announces {what} {theirs!r}, this member {ours!r}"
        return None

    def _hello(self) -> GroupHello:
        s = self.settings
        return GroupHello(
            group=str(s.name),
            member_id=self.member_id,
            instance=self.instance,
            hostname=hostname(),
            address=self.address,
            size=s.size,
            parallel=s.parallel,
            backend=s.backend,
            model=self.model,
            rank_hint=s.rank,
            sees=sorted(h.instance for h in self._current().values()),
            formed=self.formed is not None,
            sent_at=time.time(),
        )

    async def _hello_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.bus.publish(self.subject, self._hello())
            await asyncio.sleep(HELLO_INTERVAL_S)


def _rank_key(hello: GroupHello) -> tuple[int, str]:
    return (hello.rank_hint if hello.rank_hint is not None else 1 << 30, hello.member_id)


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the ring binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
