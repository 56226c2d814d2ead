"""The garbage collector on a serving node: what a node allocated to start is not walked again."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Move everything a node allocated while starting (modules, config, app, model objects) out of the
    garbage collector's sight (:func:`gc.freeze`).

    Measured on the controller under load: before, each full collection walked the ~69,000 start-up objects
    (7 of them took 0.25 s in 30,000 requests, up to 35 ms each, on the request path); after, collections see only
    what requests allocate. Call it once, when the node is ready to serve."""
    gc.collect()
    gc.freeze()
