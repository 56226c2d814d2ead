"""The logic of ``bench engine --parts speculation`` that needs no model: prompts, the rounds against fake servers
on loopback, the ratios and the report's lines."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from typer.testing import CliRunner

from mlxcluster.bench import speculation
from mlxcluster.bench.speculation import (
    EDIT_CODE,
    THEIRS,
    WITH,
    WITHOUT,
    Comparison,
    Counts,
    Reply,
    SpeculationResult,
    SpeculationSettings,
    Target,
    chat_prompt,
    edit_expected,
    edit_prompt,
    edit_rename,
    first_difference,
    format_speculation,
    line_recall,
    measure,
    target_lines,
)


def words(text: str) -> int:
    return len(text.split())


def test_edit_prompts_are_distinct_and_their_expected_answer_is_the_code_renamed() -> None:
    renames = [edit_rename(i) for i in range(60)]
    assert len(set(renames)) == 60 and {old for old, _ in renames} == set(speculation.RENAMED)
    old, new = edit_rename(0)
    prompt = edit_prompt(0)
    assert (
        prompt.startswith(f"Repeat this code exactly, but call the function {old} {new} instead")
        and EDIT_CODE in prompt
    )
    assert old not in edit_expected(0) and edit_expected(0).count(new) == EDIT_CODE.count(old) >= 2
    assert len({edit_prompt(i)[:80] for i in range(60)}) == 60  # requests differ from their first words


def test_chat_prompts_are_distinct_questions() -> None:
    prompts = [chat_prompt(i) for i in range(60)]
    assert len(set(prompts)) == 60 and all(p.endswith("?") for p in prompts)


def test_line_recall_counts_the_expected_lines_a_reply_holds() -> None:
    expected = "def f(x):\n    return x\n\n\ndef g():\n    pass"
    assert line_recall(expected, "```python\n" + expected + "\n```") == 1.0
    assert line_recall(expected, "Sure:\ndef f(x):\n  return x\ndef h():\n    pass") == 0.75  # indentation aside
    assert line_recall(expected, "nothing") == 0.0 and line_recall("", "anything") == 0.0


def test_counts_add_and_subtract() -> None:
    assert Counts(5, 40, 30).plus(Counts(2, 16, 10), -1) == Counts(3, 24, 20)
    assert Counts().plus(Counts(1, 2, 3)) == Counts(1, 2, 3)


def test_first_difference_says_where_the_texts_part() -> None:
    assert first_difference(3, "abcdef", "abcxef") == "request 3, char 3: 'def' (with) vs 'xef' (without)"
    assert first_difference(0, "ab", "abc").startswith("request 0, char 2: ''")


def test_a_rounds_decode_rate_runs_from_its_first_token_to_its_last() -> None:
    sums = speculation._Sums()
    replies = [Reply("a b c d e", first=11.0, last=13.0), Reply("f g c", first=12.0, last=14.0), Reply("")]
    sums.add(10.0, 15.0, replies, words)
    assert sums.seconds == 5.0 and sums.texts == ["a b c d e", "f g c", ""]
    assert sums.ttfts_ms == [1000.0, 2000.0]  # the reply with no text has no first token
    assert (sums.decode_tokens, sums.decode_seconds) == (4 + 2, 3.0)
    sums.add(20.0, 21.0, [Reply("")], words)
    assert (sums.decode_tokens, sums.decode_seconds, sums.seconds) == (6, 3.0, 6.0)


class FakeServer:
    """A chat server on loopback answering like a model that follows the edit exactly."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.counts = Counts()
        self.prompts: list[str] = []

    def reply(self, prompt: str) -> str:
        found = re.match(r"Repeat this code exactly, but call the function (\w+) (\w+) instead", prompt)
        if found:
            return "```python\n" + EDIT_CODE.replace(found[1], found[2]) + "\n```"
        if self.label == WITHOUT and "teenager" in prompt:
            return f"A different answer to: {prompt}"
        if self.label == THEIRS:
            return f"Their answer to: {prompt}"
        return f"An answer to: {prompt}"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["temperature"] == 0 and body["stream"] is True
        prompt = body["messages"][0]["content"]
        self.prompts.append(prompt)
        if self.label == WITH:
            self.counts = self.counts.plus(Counts(10, 80, 60, 8, 2))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": keep-alive\n\n")
        await response.write(b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n')
        for piece in re.findall(r"\S+\s*", self.reply(prompt)):  # one word a chunk
            chunk = {"choices": [{"delta": {"content": piece}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b'data: {"choices": [], "usage": {}}\n\ndata: [DONE]\n\n')
        return response

    async def workers(self, _request: web.Request) -> web.Response:
        spec = dict(self.counts._asdict()) if self.label == WITH else None
        return web.json_response({"workers": [{"worker_id": "w1", "speculation": spec}, {"worker_id": "w2"}]})


@contextlib.asynccontextmanager
async def fake_targets() -> AsyncIterator[tuple[list[Target], dict[str, FakeServer]]]:
    fakes = {label: FakeServer(label) for label in (WITH, WITHOUT, THEIRS)}
    servers: list[TestServer] = []
    targets: list[Target] = []
    try:
        for label, fake in fakes.items():
            app = web.Application()
            app.router.add_post("/v1/chat/completions", fake.completions)
            app.router.add_get("/api/cluster/workers", fake.workers)
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            servers.append(server)
            pids = (os.getpid(),) if label == WITH else ()  # the fakes' CPU is this process's
            targets.append(Target(label, str(server.make_url("")).rstrip("/"), "m", counts=label == WITH, pids=pids))
        yield targets, fakes
    finally:
        for server in servers:
            await server.close()


async def test_rounds_alternate_and_the_comparisons_add_up() -> None:
    settings = SpeculationSettings(edit_streams=(1, 2), chat_streams=(2,), rounds=2, edit_max_tokens=40)
    lines: list[str] = []
    async with fake_targets() as (targets, fakes):
        measures, comparisons = await measure(targets, settings, words, settle_s=0, progress=lines.append)
    # a warm-up, then 1+2 edits and 2 chats per round and server, never the same prompt twice
    for fake in fakes.values():
        assert fake.prompts[0] == speculation.WARM_UP_PROMPT
        assert len(fake.prompts) == 1 + 2 * (1 + 2 + 2) and len(set(fake.prompts)) == len(fake.prompts)
    assert [fake.prompts for fake in fakes.values()].count(fakes[WITH].prompts) == 3  # the same prompts to all
    assert lines[:3] == [f"edit ×1, round 1: {label}" for label in (WITH, WITHOUT, THEIRS)]
    assert lines[3:6] == [f"edit ×1, round 2: {label}" for label in (THEIRS, WITHOUT, WITH)]  # reversed

    assert [(m.workload, m.streams, m.server) for m in measures[:3]] == [
        ("edit", 1, s) for s in (WITH, WITHOUT, THEIRS)
    ]
    assert len(measures) == 9 and all(m.tokens_per_s > 0 for m in measures)
    edit_one = measures[0]
    assert edit_one.requests == 2 and edit_one.tokens == 2 * words(edit_expected(0)) + 4  # the fences: 2 words
    assert (edit_one.steps, edit_one.drafted, edit_one.accepted) == (20, 160, 120)  # 10/80/60 per request
    assert (edit_one.model_drafted, edit_one.model_accepted) == (16, 4)  # the draft model's part
    assert measures[1].drafted == 0  # counts are read from the speculating cluster only
    assert edit_one.cpu_ms_per_token > 0 and measures[1].cpu_ms_per_token == 0  # no processes to sample
    assert len(edit_one.round_tokens_per_s) == 2 and all(rate > 0 for rate in edit_one.round_tokens_per_s)
    assert all(m.ttft_p50_ms > 0 and m.decode_tokens_per_s > 0 for m in measures)

    edit, edit_two, chat = comparisons
    assert (edit.workload, edit.streams, edit_two.streams, chat.workload) == ("edit", 1, 2, "chat")
    assert edit.identical == edit.compared == 2 and edit.identical_theirs == 2 and not edit.first_difference
    assert edit.edit_recall == 1.0 and edit.renamed == 2
    assert edit.acceptance_rate == 0.75 and edit.tokens_per_step == 7.0
    assert edit.accepted_share == round(120 / edit_one.tokens, 3)
    assert edit.with_vs_without == round(measures[0].tokens_per_s / measures[1].tokens_per_s, 3)
    assert edit.with_vs_theirs == round(measures[0].tokens_per_s / measures[2].tokens_per_s, 3)
    assert edit.round_ratios == [
        round(a / b, 3) for a, b in zip(edit_one.round_tokens_per_s, measures[1].round_tokens_per_s, strict=True)
    ]
    # chat: the "teenager" question (index 1) came back differently without speculation; theirs all differ
    assert (chat.identical, chat.compared, chat.identical_theirs) == (3, 4, 0)
    assert chat.first_difference.startswith("request 1, char 1: ")
    assert chat.edit_recall == 0.0 and chat.renamed == 0

    result = SpeculationResult("test machine", "m", settings, measures, comparisons)
    text = format_speculation(result)
    assert text.startswith("bench engine --parts speculation — m, greedy")
    assert (
        "edit ×1: the replies (ours without speculation) reproduce 100% of the expected code's lines (mean); 2/2"
        in text
    )
    assert "chat ×2: first difference: request 1" in text
    assert "edit, 1 stream: output identical with and without: 2/2 (met)" in text
    assert json.loads(result.to_json())["comparisons"][2]["identical"] == 3


async def test_a_refused_request_fails_the_run_with_the_servers_answer() -> None:
    async def refuse(_request: web.Request) -> web.Response:
        return web.Response(status=503, text="no worker")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        target = Target(THEIRS, str(server.make_url("")).rstrip("/"), "m")
        with pytest.raises(RuntimeError, match="mlx_lm.server: HTTP 503: no worker"):
            await measure([target], SpeculationSettings(), words, settle_s=0)
    finally:
        await server.close()


def comparison(workload: str, streams: int, with_vs_without: float, with_vs_theirs: float, **extra: Any) -> Comparison:
    fields: dict[str, Any] = {
        "without_vs_theirs": 1.0,
        "acceptance_rate": 0.5,
        "accepted_share": 0.4,
        "tokens_per_step": 3.0,
        "identical": 8,
        "compared": 8,
        "identical_theirs": 8,
        **extra,
    }
    return Comparison(workload, streams, with_vs_without, with_vs_theirs, **fields)


def test_the_chat_cost_line_gives_the_rounds_spread_and_the_cpu_ratio() -> None:
    (line,) = target_lines([comparison("chat", 1, 0.9, 1.0, round_ratios=[0.85, 0.95], cpu_with_vs_without=1.01)])
    assert line == (
        "chat, 1 stream: speculation costs 10.0% tokens/s (with / without 0.900×; target ≤ 3%: NOT met; "
        "per round 0.85–0.95×; CPU per token with / without 1.010×)"
    )
    result = SpeculationResult("machine", "m", SpeculationSettings(), [], [comparison("chat", 16, 0.9, 1.0)])
    assert "per round" in format_speculation(result)


def test_target_lines_state_each_target_met_or_not() -> None:
    lines = target_lines(
        [
            comparison("edit", 1, 2.1, 1.75),
            comparison("edit", 8, 1.35, 1.4, identical=7),
            comparison("chat", 1, 0.99, 1.0),
            comparison("chat", 8, 0.95, 1.1),
            comparison("chat", 16, 1.0, 1.02),
        ]
    )
    assert lines == [
        "edit, 1 stream: with / without speculation 2.10× (target ≥ 1.8×: met)",
        "edit, 1 stream: with speculation / mlx_lm.server 1.75× (target ≥ 1.8×: NOT met)",
        "edit, 1 stream: output identical with and without: 8/8 (met)",
        "edit, 8 streams: with / without speculation 1.35× (target ≥ 1.3×: met)",
        "edit, 8 streams: with speculation / mlx_lm.server 1.40× (target ≥ 1.3×: met)",
        "edit, 8 streams: output identical with and without: 7/8 (NOT met)",
        "chat, 1 stream: speculation costs 1.0% tokens/s (with / without 0.990×; target ≤ 3%: met)",
        "chat, 8 streams: speculation costs 5.0% tokens/s (with / without 0.950×; target ≤ 3%: NOT met)",
        "chat, 8 streams: ours (speculation on) / mlx_lm.server 1.10× (target ≥ 1.05×: met)",
        "chat, 16 streams: speculation costs 0.0% tokens/s (with / without 1.000×; target ≤ 3%: met)",
        "chat, 16 streams: ours (speculation on) / mlx_lm.server 1.02× (target ≥ 1.05×: NOT met)",
    ]


def test_a_step_with_no_verify_shows_a_dash() -> None:
    settings = SpeculationSettings.quick()
    assert settings.rounds == 1 and settings.max_streams() == 8
    result = SpeculationResult("machine", "m", settings, [], [comparison("chat", 8, 1.0, 1.0, tokens_per_step=0.0)])
    row = next(line for line in format_speculation(result).splitlines() if line.lstrip().startswith("chat"))
    assert " - " in row


async def test_servers_start_both_clusters_and_mlx_lm_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlxcluster.bench import versus

    started: list[tuple[str, dict[str, Any]]] = []

    class Cluster:
        def __init__(self, port: int) -> None:
            self.base_url = f"http://127.0.0.1:{port}"
            self.port = port

        def pids(self) -> tuple[int, ...]:
            return (1000 + self.port,)

    @contextlib.asynccontextmanager
    async def cluster(model_path: str, **options: Any) -> AsyncIterator[Cluster]:
        started.append(("cluster", options))
        yield Cluster(len(started))

    @contextlib.asynccontextmanager
    async def theirs(model_path: str, **options: Any) -> AsyncIterator[str]:
        started.append(("mlx_lm", options))
        options["pids"].append(4242)
        yield "http://127.0.0.1:9"

    monkeypatch.setattr(versus, "mlxcluster_server", cluster)
    monkeypatch.setattr(versus, "mlx_lm_server", theirs)
    async with speculation.servers("/models/Demo-Model", SpeculationSettings(draft_tokens=6)) as targets:
        assert [(t.label, t.model, t.counts) for t in targets] == [
            (WITH, "Demo-Model", True),
            (WITHOUT, "Demo-Model", False),
            (THEIRS, "default_model", False),
        ]
        assert [t.pids for t in targets] == [(1001,), (1002,), (4242,)]  # whose CPU each round samples
    (_, spec), (_, plain), (_, mlx) = started
    assert spec["max_concurrent"] == plain["max_concurrent"] == mlx["decode_concurrency"] == 16
    assert spec["env"]["MLXCLUSTER_WORKER_SPECULATIVE_TOKENS"] == "6"
    assert plain["env"]["MLXCLUSTER_WORKER_SPECULATIVE_TOKENS"] == "0"
    assert spec["env"]["MLXCLUSTER_DISCOVERY_HEARTBEAT_INTERVAL_MS"] == "500"


async def test_run_speculation_measures_on_the_servers_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlxcluster.bench import versus

    @contextlib.asynccontextmanager
    async def servers(
        model_path: str, settings: SpeculationSettings, draft_model: str | None = None
    ) -> AsyncIterator[list[Target]]:
        assert draft_model is None  # no draft_layers: prompt lookup only
        async with fake_targets() as (targets, _fakes):
            yield targets

    monkeypatch.setattr(speculation, "servers", servers)
    monkeypatch.setattr(speculation, "SETTLE_S", 0.0)
    monkeypatch.setattr(versus, "token_counter", lambda _path: words)
    settings = SpeculationSettings(edit_streams=(1,), chat_streams=(1,), rounds=1)
    result = await speculation.run_speculation("/models/Demo-Model", settings)
    assert result.model == "Demo-Model" and len(result.measures) == 6 and len(result.comparisons) == 2


def test_the_engine_command_rejects_unknown_parts() -> None:
    from mlxcluster.cli import app

    out = CliRunner().invoke(app, ["bench", "engine", "--parts", "speculation,nope"])
    assert out.exit_code != 0 and "speculation" in out.output


def test_the_speculation_section_runs_the_speculation_part() -> None:
    from mlxcluster.bench.report import SECTIONS, _timeout

    section = next(s for s in SECTIONS if s.name == "speculation")
    assert section.title == "Speculative decoding" and section.args == ["engine", "--parts", "speculation"]
    assert _timeout(section.args, 0) == 1800 and not section.families
