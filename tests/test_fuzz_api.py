"""Schemathesis against the live controller: every operation of ``/openapi.json``, fuzzed.

The controller (``create_app``, served by aiohttp on 127.0.0.1) and two echo workers run on the real
nats-server in a background thread with its own event loop; schemathesis drives them over HTTP from the
test thread, with the document the server itself serves. API keys are on, so schemathesis's
``ignored_auth`` check also proves that every operation declared secured refuses a missing or wrong key.

What counts as a pass, for every generated request (valid and invalid, "positive" and "negative" cases):

- no 5xx, with one exception: ``503`` whose error ``code`` is ``no_capacity`` or ``not_ready`` and that
  carries ``Retry-After`` (the documented "try again" answer). ``500`` is never acceptable;
- the status code, content type and body match the document (schemathesis's conformance checks);
- invalid input is refused with a 4xx (``negative_data_rejection``);
- a streamed answer ends with ``[DONE]`` and carries no in-band error.

Bounded: at most ``MAX_EXAMPLES`` generated cases per operation and mode (positive, negative), derandomized
(the same cases every run), no Hypothesis deadline; the whole module takes well under a minute.

The cases come from ``operation.as_strategy`` under a plain ``@given``: schemathesis's own pytest loader
(``schemathesis.pytest.from_fixture``) touches ``Function._nodeid``, which pytest 9 no longer has.
"""

from __future__ import annotations

import asyncio
import json
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from cluster_harness import Cluster
from hypothesis import HealthCheck, Phase, given, settings
from loopback import shared_config
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from mlxcluster.config import Config
from mlxcluster.controller.http.openapi import OPERATIONS
from mlxcluster.embedded import EmbeddedNatsServer

API_KEY = "fuzz-key-7c1f"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_EXAMPLES = 100
ECHO_MODEL = "echo"
RETRYABLE_503 = {"no_capacity", "not_ready"}
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]


class LiveCluster:
    """nats-server, two echo workers and the controller, in a thread of their own."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.url = ""
        self.routes: set[tuple[str, str]] = set()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="live-cluster", daemon=True)

    def __enter__(self) -> LiveCluster:
        self._thread.start()
        if not self.ready.wait(60) or self.error is not None:
            raise RuntimeError(f"the live cluster did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with EmbeddedNatsServer(self.config.nats), Cluster(self.config) as cluster:
                for worker_id in ("fuzz-a", "fuzz-b"):
                    await cluster.start_worker(worker_id)
                controller = await cluster.start_controller()
                self.url = controller.url
                self.routes = {
                    (route.method.lower(), route.resource.canonical)
                    for route in controller.app.router.routes()
                    if route.resource is not None and route.method != "HEAD"
                }
                await wait_online(controller.url, 2)
                self.ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self.error = exc
            self.ready.set()


async def wait_online(url: str, count: int, timeout: float = 20.0) -> None:
    def online() -> int:
        response = requests.get(f"{url}/api/cluster/workers?status=online", headers=AUTH, timeout=5)
        return len(response.json()["workers"])

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await asyncio.to_thread(online) < count:
        if loop.time() > deadline:
            raise TimeoutError(f"{count} workers not online within {timeout}s")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    config = shared_config(  # shared state on: the key and usage routes do their work, not answer 409
        str(tmp_path_factory.mktemp("jetstream")),
        controller={"api_keys": [API_KEY], "max_body_bytes": 256 * 1024, "request_timeout_s": 10},
        metrics={"exporters": ["prometheus"]},
        discovery={"heartbeat_interval_ms": 500, "offline_timeout_ms": 5000},
    )
    with LiveCluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(live: LiveCluster) -> Any:
    """The document the live controller serves, loaded by schemathesis."""
    loaded = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    loaded.config.update(base_url=live.url)
    return loaded


def test_the_document_describes_every_route_and_only_those(live: LiveCluster) -> None:
    response = requests.get(f"{live.url}/openapi.json", timeout=10)  # no key: the document is public
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    documented = {(method, path) for path, ops in document["paths"].items() for method in ops}
    assert documented == live.routes
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            secured = path.startswith(("/v1/", "/api/"))
            assert operation["security"] == ([{"bearerAuth": []}] if secured else []), (method, path)
            assert ("401" in operation["responses"]) is secured, (method, path)
    assert document["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    schemas = document["components"]["schemas"]
    assert set(schemas["ChatCompletionRequest"]["required"]) == {"model", "messages"}  # from the msgspec Struct
    assert schemas["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 1 << 20
    assert schemas["Error"]["properties"]["error"]["required"] == ["message", "type", "param", "code"]


def aim_at_the_echo_model(case: Any) -> None:
    """Send two out of three valid bodies to the served ``echo`` model, so they reach a worker.

    Only positive cases are edited: schemathesis takes the case as generated to know what it made invalid.
    """
    body = case.body
    if case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE:
        return
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        digest = zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode())
        if digest % 3:
            body["model"] = ECHO_MODEL


def assert_no_server_error(response: requests.Response) -> None:
    """No 5xx, except a 503 that says "no capacity" or "not ready" and when to retry."""
    if response.status_code < 500:
        return
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if response.status_code == 503 and code in RETRYABLE_503 and "Retry-After" in response.headers:
        return
    raise AssertionError(f"{response.status_code} ({code}) for {response.request.method} {response.request.url}")


def assert_stream_completes(response: requests.Response) -> None:
    if response.status_code != 200 or not response.headers.get("Content-Type", "").startswith("text/event-stream"):
        return
    named = [line[7:] for line in response.text.splitlines() if line.startswith("event: ")]
    if named:  # the Responses and Anthropic streams: named events, no [DONE]
        assert named[-1] in ("response.completed", "response.incomplete", "message_stop"), response.text[-500:]
        return
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", response.text[-500:]
    for event in events[:-1]:
        assert "error" not in json.loads(event), event


def check_case(case: Any, session: requests.Session) -> None:
    aim_at_the_echo_model(case)
    response = case.call(session=session, headers=AUTH, timeout=30)
    assert_no_server_error(response)
    assert_stream_completes(response)
    case.validate_response(response, checks=CHECKS, excluded_checks=[not_a_server_error], headers=AUTH)


def _takes_input(operation: dict[str, Any]) -> bool:
    """Whether an operation has a body or query parameters that can be made invalid (a path parameter is any
    string, so it has no invalid form)."""
    return "requestBody" in operation or any(p.get("in") == "query" for p in operation.get("parameters", []))


FUZZ_CASES = [
    pytest.param(f"{method.upper()} {path}", mode, id=f"{method.upper()} {path}-{mode.value}")
    for path, methods in OPERATIONS.items()
    for method, operation in methods.items()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or _takes_input(operation)
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("label", "mode"), FUZZ_CASES)
def test_no_input_makes_the_controller_fail(api_schema: Any, label: str, mode: GenerationMode) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is documented but the test app does not serve it"

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode, headers=AUTH))
    def run(case: Any) -> None:
        check_case(case, session)

    with requests.Session() as session:  # one keep-alive connection per operation
        run()
