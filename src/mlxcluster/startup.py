"""Start-up stages that a signal may cut short: connecting to NATS, resolving (downloading) a model, loading it.

Each stage is awaited with :func:`until_stop`, which gives up as soon as the node's stop event is set and
raises :class:`StartInterrupted`. Blocking work (a download, a load) runs on a daemon thread
(:func:`on_daemon_thread`) that nobody waits for once abandoned: the process then ends with
:func:`leave_now`, without joining it (a download's own thread pool would otherwise hold the interpreter's
exit until its files finished; a partial download resumes next time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import NoReturn, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

log = logging.getLogger(__name__)


class StartInterrupted(Exception):
    """The node was stopped while it was starting; the message names the stage (e.g. ``connecting to NATS``).

    :param code: the exit code (0: a signal asked for the stop).
    """

    def __init__(self, stage: str, code: int = 0) -> None:
        super().__init__(stage)
        self.code = code


async def until_stop(awaitable: Awaitable[T], stop: asyncio.Event, stage: str) -> T:
    """The result of ``awaitable``, or :class:`StartInterrupted` as soon as ``stop`` is set (it is then cancelled)."""
    work = asyncio.ensure_future(awaitable)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([work, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):  # its own clean-up (a socket closed); nothing waits on a thread
                await asyncio.wait_for(asyncio.shield(work), 0.5)
    if work.cancelled() and stop.is_set():
        raise StartInterrupted(stage)
    return work.result()


def on_daemon_thread(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
    """Run ``function`` on a new daemon thread; the future settles with its result or exception.

    Cancelling the future does not stop the thread (nothing can): it is left to finish or to die with the process.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = function(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting side
            error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=run, name=f"start-{getattr(function, '__name__', 'stage')}", daemon=True).start()
    return future


def leave_now(code: int) -> NoReturn:
    """End the process with ``code`` at once, logs and output flushed, without waiting for other threads."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_node(code: int) -> NoReturn:
    """End a node's process with ``code``: at once (:func:`leave_now`) once mlx is loaded, else by ``SystemExit``.

    With mlx loaded, the interpreter's normal exit (its finalisation, then C++ static destructors) races mlx's
    own native threads: on a busy machine about one exit in six aborted ("terminate called without an active
    exception") and the node's code became 134. Nothing is left to clean up by then: the node has stopped, its
    bus is closed, its logs are flushed here.
    """
    if "mlx.core" in sys.modules:
        leave_now(code)
    raise SystemExit(code)
