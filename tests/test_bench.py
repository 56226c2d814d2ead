"""The echo benchmarks run in their smallest form: each report has the shape asked for and sane figures.

Speed is not asserted here (that is what the benchmarks are for); what is asserted is that every
benchmark runs end to end against real processes and reports what it measured: counts that match the
parameters, no errors, positive rates, p50 ≤ p99. Each test starts its own nats-server, controller and
echo workers through the benchmark's own code and takes well under 30 s on two busy cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxcluster.bench import cluster as cluster_bench
from mlxcluster.bench import faults as faults_bench
from mlxcluster.bench import nats as nats_bench
from mlxcluster.bench import scale as scale_bench
from mlxcluster.bench import soak as soak_bench
from mlxcluster.bench.procs import BenchCluster
from mlxcluster.bench.report import refresh_sections, run_section, soak_sections
from mlxcluster.bench.stats import percentile
from mlxcluster.bench.wrk import parse_wrk_output
from mlxcluster.embedded import EmbeddedNatsServer

pytestmark = pytest.mark.timeout(180)


def test_percentile_is_nearest_rank_and_zero_for_no_samples() -> None:
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(samples, p) for p in (0, 50, 99, 100)] == [1.0, 3.0, 5.0, 5.0]
    assert percentile([], 50) == 0.0


async def test_bench_nats_counts_what_it_was_asked() -> None:
    result = await nats_bench.run_nats_bench(requests=20, messages=500, payload=16)
    assert (result.requests, result.messages, result.payload_bytes) == (20, 500, 16)
    assert result.server_start_ms > 0 and result.config_load_ms > 0
    assert 0 < result.request_p50_ms <= result.request_p99_ms
    assert result.publish_msgs_per_s > 0
    assert json.loads(result.to_json())["requests"] == 20
    text = nats_bench.format_table(result)
    assert f"{result.request_p50_ms:.3f} ms" in text and "500 msgs" in text


async def test_bench_cluster_steps_through_the_worker_counts_and_a_two_process_controller() -> None:
    sizes = cluster_bench.BenchSizes(
        latency_requests=20,
        throughput_requests=60,
        concurrency=4,
        time_limit_s=3,
        worker_counts=(1, 2),
        rounds=1,
        stream_requests=4,
    )
    result = await cluster_bench.run_cluster_bench(sizes, processes=2)
    assert result.engine == "echo (no model)"
    assert result.processes == 2 and result.processes_requests_per_s > 0 and result.processes_ratio > 0
    assert [(row.workers, row.concurrency) for row in result.throughput] == [(1, 4), (2, 4)]
    for row in result.throughput:
        assert row.errors == 0
        assert row.requests > 0 and row.requests_per_s > 0 and 0 < row.p50_ms <= row.p99_ms
    assert 0 < result.cluster_p50_ms <= result.cluster_p99_ms
    assert result.bare_nats_p50_ms > 0  # HTTP + one NATS round trip with none of our code, in the same run
    assert result.stream_tokens_per_s > 0
    text = cluster_bench.format_table(result)
    assert f"{result.cluster_p50_ms:.3f}" in text and f"{result.bare_nats_p50_ms:.3f}" in text
    assert f"a controller of 2 processes on one port, the same step: {result.processes_requests_per_s:,.0f}" in text


async def test_run_load_counts_failures_as_errors() -> None:
    """Nothing listens on the port: every request is an error, none a latency sample."""
    from loopback import free_port

    load = await cluster_bench.run_load(
        f"http://127.0.0.1:{free_port()}",
        concurrency=2,
        requests=6,
        time_limit_s=10,
        body=lambda n: cluster_bench.chat_body(f"request {n}"),
    )
    assert load.errors == 6 and load.latencies_ms == [] and load.tokens == 0


async def test_bench_scale_sees_the_whole_simulated_fleet() -> None:
    result = await scale_bench.run_scale_bench(fleets=(20,), window_s=1.5, interval_ms=200)
    assert result.heartbeat_interval_ms == 200 and result.window_s == 1.5
    (row,) = result.rows
    assert row.workers == 20 and row.workers_online == 20
    assert row.heartbeats_per_s > 0 and row.heartbeat_lag_p50_ms <= row.heartbeat_lag_p99_ms
    assert 0 < row.pick_p50_us <= row.pick_p99_us
    assert row.shared_pick_p50_us > 0 and row.least_loaded_pick_p50_us > 0
    assert row.cache_index_entries > 0
    assert row.cache_hits == 1.0  # every simulated worker has free slots: cache_aware sends each turn to its holder
    text = scale_bench.format_table(result)
    assert "heartbeat every 200 ms" in text and f"{row.heartbeats_per_s:,.0f}" in text


async def test_bench_soak_reports_every_window_and_process() -> None:
    result = await soak_bench.run_soak(minutes=0.1, window_s=2)
    assert result.mode == "echo" and result.minutes == 0.1
    assert result.capacity_slots == soak_bench.WORKERS * soak_bench.MAX_CONCURRENT
    assert result.clients == result.capacity_slots // 2
    assert 1 <= len(result.windows) <= 3  # 6 s in windows of 2 s (fewer if a loaded machine stretches them)
    processes = {"controller", "worker1", "worker2", "nats-server"}
    for window in result.windows:
        assert window.requests > 0 and window.errors == 0
        assert 0 < window.p50_ms <= window.p99_ms
        assert set(window.rss_mb) == processes and all(mb > 0 for mb in window.rss_mb.values())
    assert set(result.rss_growth_percent) == processes
    assert result.errors == 0
    assert (result.p99_first_ms, result.p99_last_ms) == (result.windows[0].p99_ms, result.windows[-1].p99_ms)
    text = soak_bench.format_table(result)
    assert f"{result.windows[0].requests}" in text


async def test_bench_faults_moves_the_killed_workers_streams() -> None:
    result = await faults_bench.run_faults_bench(rounds=1, tokens=30)
    assert (result.tokens, result.token_delay_ms) == (30, faults_bench.TOKEN_DELAY_MS)
    (round_,) = result.rounds
    assert round_.streams == faults_bench.STREAMS
    assert round_.completed == faults_bench.STREAMS, round_.failures  # the victim's streams moved and finished
    assert round_.failures == []
    assert 0 < round_.detect_s < 20  # -1 would mean the victim was never listed offline
    assert round_.migrations >= 1
    assert round_.moved_p50_s > 0 and round_.longest_gap_p50_s > 0
    assert f"{round_.completed}/{round_.streams}" in faults_bench.format_table(result)


async def test_bench_cluster_names_the_process_that_died() -> None:
    config = nats_bench.bench_config()
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    cluster = BenchCluster(nats_url=server.url, env={"MLXCLUSTER_WORKER_ENGINE": "echo"})
    try:
        cluster.start_controller()
        cluster.start_worker("doomed", {"MLXCLUSTER_WORKER_ENGINE": "no-such-engine"})
        with pytest.raises(RuntimeError, match="doomed exited with code"):
            await cluster.wait_for_workers(1, timeout=60)
    finally:
        cluster.stop()
        await server.stop()
    assert cluster.processes == []


# --- wrk's output, as wrk 4.x prints it with --latency ---------------------------------------------

WRK_OUTPUT = """\
Running 3s test @ http://127.0.0.1:8080/v1/chat/completions
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms  456.00us   8.90ms   85.00%
    Req/Sec     3.21k   123.45     3.50k    70.00%
  Latency Distribution
     50%  850.00us
     75%    1.40ms
     90%    1.80ms
     99%    3.20ms
  9630 requests in 3.00s, 1.23MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 30
Requests/sec:   3210.00
Transfer/sec:    420.12KB
"""


def test_wrk_output_is_read_into_requests_errors_and_percentiles() -> None:
    result = parse_wrk_output(WRK_OUTPUT)
    assert result.requests == 9600  # non-2xx answers are not counted as served
    assert result.errors == 30 + 3  # non-2xx plus socket errors
    assert result.seconds == 3.0
    assert result.p50_ms == pytest.approx(0.85) and result.p99_ms == 3.2
    assert result.requests_per_s == 3200.0


def test_wrk_output_without_a_summary_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="could not read wrk's output"):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


# --- bench report's sections -----------------------------------------------------------------------


def test_report_section_is_the_benchmarks_output_or_its_failure() -> None:
    ok = run_section(["nats", "--requests", "10", "--messages", "100", "--payload", "8"], timeout_s=120)
    assert ok.startswith("bench nats") and "(10 x 8 B)" in ok
    assert ok.rstrip().endswith("`mlxcluster bench nats --requests 10 --messages 100 --payload 8`)")
    failed = run_section(["nats", "--requests", "1"], timeout_s=120)  # below the option's minimum
    assert failed.startswith("FAILED with exit code 2:")
    # killed long before it could start anything (the Python start-up alone takes longer); nats-server would
    # die with it anyway
    assert run_section(["nats", "--requests", "10"], timeout_s=0.1) == "(did not finish within 0 s)"


def test_soak_sections_and_their_keys() -> None:
    assert soak_sections(0) == []
    sections = soak_sections(2)
    assert [section.name for section in sections] == ["soak", "soak-cache-full"]
    assert all(s.args[s.args.index("--minutes") + 1] == "2" for s in sections)


def test_refreshing_one_section_keeps_the_others(tmp_path: Path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\n## Message bus\n\nold figures\n\n## Engine\n\nkept as it was\n")
    progress: list[str] = []
    refresh_sections(report, ["nats"], quick=False, soak_minutes=0, progress=progress.append)
    assert progress == ["bench nats...", f"wrote {report}"]
    text = report.read_text()
    bus = text.split("## Message bus\n", 1)[1].split("## Engine\n", 1)[0]
    assert "old figures" not in bus and "bench nats — " in bus
    assert "Refreshed alone by a run (`mlxcluster bench report --only nats`)" in bus and "load average" in bus
    assert text.endswith("## Engine\n\nkept as it was\n")
