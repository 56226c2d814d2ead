"""``mlxcluster bench ...``: each benchmark's command; the benchmarks themselves live in ``bench/``.

The bench modules (and mlx, aiohttp, nats) are imported inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlxcluster.cli.common import ConfigOption, JsonOption, get_config

FamiliesDirOption = Annotated[
    Path | None,
    typer.Option(
        "--families-dir",
        help="Where the model-family fixtures were built (python tests/families.py DIR; make bench does it).",
    ),
]

bench_app = typer.Typer(help="Benchmarks (figures are ratios measured in the same run).", no_args_is_help=True)


@bench_app.command("nats")
def bench_nats(
    as_json: JsonOption = False,
    requests: Annotated[int, typer.Option(help="Request/reply round trips to time.", min=10)] = 5000,
    messages: Annotated[int, typer.Option(help="Messages for the publish throughput test.", min=100)] = 200_000,
    payload: Annotated[int, typer.Option(help="Payload bytes per message.", min=1)] = 128,
) -> None:
    """Embedded server start time, request/reply latency and publish throughput on loopback."""
    import asyncio

    from mlxcluster.bench.nats import format_table, run_nats_bench

    result = asyncio.run(run_nats_bench(requests=requests, messages=messages, payload=payload))
    typer.echo(result.to_json() if as_json else format_table(result))


@bench_app.command("cluster")
def bench_cluster(
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
    requests: Annotated[int, typer.Option(help="Requests at most per target in a throughput step.", min=10)] = 200_000,
    latency_requests: Annotated[int, typer.Option(help="Sequential requests per target (latency).", min=10)] = 2000,
    concurrency: Annotated[int, typer.Option(help="Concurrent clients in the throughput steps.", min=1)] = 32,
    time_limit: Annotated[float, typer.Option(help="Seconds at most per target in a step.", min=1)] = 20.0,
    real: Annotated[bool, typer.Option(help="Also compare with mlx_lm.server on the demo model.")] = True,
    streams: Annotated[str, typer.Option(help="Concurrencies for the real-model comparison.")] = "1,4",
    max_tokens: Annotated[int, typer.Option(help="Tokens per request in the real-model comparison.")] = 64,
    quick: Annotated[bool, typer.Option("--quick", help="Smaller steps, one worker, no real model (~1 min).")] = False,
    wrk: Annotated[bool, typer.Option("--wrk", help="Drive the throughput steps with wrk (time-bound).")] = False,
    profile: Annotated[
        Path | None, typer.Option(help="Run controller and workers under cProfile; .prof files go here.")
    ] = None,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            min=1,
            help="Also measure a controller of N processes on one port beside the one-process one (throughput).",
        ),
    ] = 1,
) -> None:
    """Echo: added latency and throughput of the cluster path against a bare aiohttp handler returning the
    same JSON, req/s at 1/2/4 workers, streamed tokens/s; then the real model side by side with mlx_lm.server."""
    import asyncio
    import json

    import msgspec

    from mlxcluster.bench.cluster import BenchSizes, format_table, run_cluster_bench

    real = real and not quick
    if real:
        from mlxcluster.worker.blas import maybe_reexec_with_openblas

        maybe_reexec_with_openblas()
    sizes = BenchSizes.quick_sizes() if quick else BenchSizes(latency_requests, requests, concurrency, time_limit)
    result = asyncio.run(run_cluster_bench(sizes, use_wrk=wrk, profile_dir=profile, processes=processes))
    versus = []
    if real:
        from mlxcluster.bench.versus import run_versus
        from mlxcluster.models.demo import ensure_demo_model

        model_path = str(ensure_demo_model(get_config(config_path).models_dir))
        counts = tuple(int(n) for n in streams.split(",") if n.strip())
        versus = asyncio.run(run_versus(model_path, streams=counts, max_tokens=max_tokens))
    if as_json:
        typer.echo(
            json.dumps({"echo": msgspec.to_builtins(result), "versus_mlx_lm_server": msgspec.to_builtins(versus)})
        )
        return
    typer.echo(format_table(result))
    if versus:
        from mlxcluster.bench.versus import format_versus

        typer.echo(
            f"\nreal model ({Path(model_path).name}), greedy, {max_tokens} tokens, streamed:\n" + format_versus(versus)
        )


@bench_app.command("engine")
def bench_engine(
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
    model: Annotated[str | None, typer.Option(help="Model dir (default: the demo model).")] = None,
    streams: Annotated[int, typer.Option(help="Concurrent streams.", min=2)] = 8,
    max_tokens: Annotated[int, typer.Option(help="Tokens per request at most.", min=8)] = 128,
    parts: Annotated[
        str,
        typer.Option(
            help="speed (in-process vs over NATS), stall (the step budget's curve: a running stream's gaps and a "
            "long prompt's TTFT per step_budget_ms), speculation (edit and chat workloads with speculative decoding "
            "vs without vs mlx_lm.server), profile (CPU per token per process against mlx_lm.server, and where the "
            "generation thread's time goes), or several: speed,stall."
        ),
    ] = "speed",
    budgets: Annotated[
        str, typer.Option(help="The stall part's step_budget_ms values (0: no budget, 256 tokens a step).")
    ] = "0,150,250,400,600,800",
    prompt_tokens: Annotated[int, typer.Option(help="The stall part's long prompt, in tokens.", min=64)] = 2000,
    rounds: Annotated[
        int,
        typer.Option(
            help="The speculation part's rounds per workload and concurrency (the profile part's: per server).",
            min=1,
        ),
    ] = 2,
    quick: Annotated[
        bool, typer.Option("--quick", help="The speculation part: one round, edit at 1 stream, chat at 8.")
    ] = False,
    draft_layers: Annotated[
        int,
        typer.Option(
            help="The speculation part: the speculating cluster also drafts with a draft model, the model cut to "
            "its first N layers (a layer-skip self-draft; worker.draft_model); 0: prompt lookup only.",
            min=0,
        ),
    ] = 0,
) -> None:
    """mlx engine in-process vs the same model behind one worker over NATS (1 and N streams); with --parts stall,
    the step budget's curve (budget → running stream's gap ratio, long prompt's TTFT ratio); with --parts
    speculation, speculative decoding on an edit and a chat workload against no speculation and mlx_lm.server;
    with --parts profile, where the time of N streams goes (CPU per token per process, the generation thread)."""
    import asyncio

    names = {part.strip() for part in parts.split(",") if part.strip()}
    if not names or names - {"speed", "stall", "speculation", "profile"}:
        raise typer.BadParameter(
            f"parts are speed, stall, speculation and profile, not {parts!r}", param_hint="--parts"
        )
    try:
        values = tuple(float(b) for b in budgets.split(",") if b.strip())
    except ValueError:
        raise typer.BadParameter(f"budgets are numbers of ms, not {budgets!r}", param_hint="--budgets") from None
    if "stall" in names and (not values or min(values) < 0):
        raise typer.BadParameter(f"budgets are ms ≥ 0, not {budgets!r}", param_hint="--budgets")
    from mlxcluster.worker.blas import maybe_reexec_with_openblas

    maybe_reexec_with_openblas()  # measure in-process on the same BLAS the worker gets
    from mlxcluster.models.demo import DEMO_BASE_NAME, ensure_demo_model

    config = get_config(config_path)
    model_path = model or str(ensure_demo_model(config.models_dir))
    served = DEMO_BASE_NAME if model is None else Path(model).name
    outputs: dict[str, str] = {}
    if "speed" in names:
        from mlxcluster.bench.engine import format_table, run_engine_bench

        result = asyncio.run(
            run_engine_bench(model_path=model_path, served_name=served, streams=streams, max_tokens=max_tokens)
        )
        outputs["speed"] = result.to_json() if as_json else format_table(result)
    if "stall" in names:
        from mlxcluster.bench.stall import format_curve, run_curve

        curve = asyncio.run(run_curve(model_path, budgets=values, prompt_tokens=prompt_tokens))
        outputs["stall"] = curve.to_json() if as_json else format_curve(curve)
    if "speculation" in names:
        from mlxcluster.bench.speculation import SpeculationSettings, format_speculation, run_speculation

        settings = SpeculationSettings.quick() if quick else SpeculationSettings(rounds=rounds)
        settings.draft_layers = draft_layers
        spec = asyncio.run(run_speculation(model_path, settings, progress=lambda line: typer.echo(line, err=True)))
        outputs["speculation"] = spec.to_json() if as_json else format_speculation(spec)
    if "profile" in names:
        from mlxcluster.bench.profile import format_profile, run_profile

        profile = asyncio.run(run_profile(model_path, streams=streams, max_tokens=max_tokens, rounds=rounds))
        outputs["profile"] = profile.to_json() if as_json else format_profile(profile)
    if as_json and len(outputs) > 1:  # one JSON document: {"speed": ..., "stall": ...}
        typer.echo("{" + ", ".join(f'"{name}": {text}' for name, text in outputs.items()) + "}")
    else:
        typer.echo("\n\n".join(outputs.values()))


@bench_app.command("arrivals")
def bench_arrivals(
    as_json: JsonOption = False,
    families_dir: FamiliesDirOption = None,
    model: Annotated[str | None, typer.Option(help="Model dir (default: qwen3_demo under --families-dir).")] = None,
    streams: Annotated[int, typer.Option(help="Running streams.", min=1)] = 8,
    stream_tokens: Annotated[int, typer.Option(help="Tokens each running stream decodes.", min=8)] = 96,
    tools: Annotated[int, typer.Option(help="Tools in the arrivals' prompt (15: ~2,100 tokens).", min=1)] = 15,
    rounds: Annotated[int, typer.Option(help="Rounds of the alternating modes.", min=1)] = 2,
    quick: Annotated[bool, typer.Option("--quick", help="One round of 48-token streams, 3 arrivals.")] = False,
) -> None:
    """Running streams' inter-token gaps while requests arrive whose long tool-list prompt is cached but whose
    forced tool is new, against no arrivals (issue 19's target: p99 ≤ 1.25×)."""
    import asyncio

    from mlxcluster.worker.blas import maybe_reexec_with_openblas

    maybe_reexec_with_openblas()
    from mlxcluster.bench.arrivals import ArrivalSettings, format_arrivals, run_arrivals
    from mlxcluster.bench.family_dirs import DEMO_FAMILY, MissingFamilies, family_dirs

    if model is None:
        try:
            model = str(family_dirs(families_dir, (DEMO_FAMILY,))[DEMO_FAMILY])
        except MissingFamilies as missing:
            typer.echo(f"bench arrivals: {missing}")
            return
    if quick:
        settings = ArrivalSettings.quick()
    else:
        settings = ArrivalSettings(
            streams=streams,
            stream_tokens=stream_tokens,
            tools=tools,
            rounds=rounds,
            max_arrivals=max(1, tools // rounds),
        )
    result = asyncio.run(run_arrivals(model, settings))
    typer.echo(result.to_json() if as_json else format_arrivals(result))


@bench_app.command("fuzz")
def bench_fuzz(
    as_json: JsonOption = False,
    families_dir: FamiliesDirOption = None,
    requests: Annotated[int, typer.Option(help="Random requests to send.", min=1)] = 2000,
    time_limit: Annotated[float, typer.Option(help="Seconds after which no request is sent.", min=1)] = 900.0,
    seed: Annotated[int, typer.Option(help="Seed of the random requests.")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="200 requests.")] = False,
) -> None:
    """Random requests (sampling, logit_bias, stops, schemas, tools, reasoning, templates) against one engine per
    random-weight family fixture at once, injected faults among them: no engine may die, every request must end
    with Done or a request error."""
    import asyncio

    from mlxcluster.worker.blas import maybe_reexec_with_openblas

    maybe_reexec_with_openblas()
    from mlxcluster.bench.family_dirs import RANDOM_FAMILIES, MissingFamilies, family_dirs
    from mlxcluster.bench.fuzz import FuzzSettings, format_fuzz, run_fuzz

    try:
        paths = family_dirs(families_dir, RANDOM_FAMILIES)
    except MissingFamilies as missing:
        typer.echo(f"bench fuzz: {missing}")
        return
    settings = FuzzSettings(requests=200 if quick else requests, time_limit_s=time_limit, seed=seed)
    result = asyncio.run(run_fuzz(paths, settings))
    typer.echo(result.to_json() if as_json else format_fuzz(result))
    if not result.ok:
        raise typer.Exit(1)


@bench_app.command("models")
def bench_models(
    as_json: JsonOption = False,
    families_dir: FamiliesDirOption = None,
    parts: Annotated[str, typer.Option(help="Parts to run: load (1 and 2), pair (3), admission (4).")] = "",
    repetitions: Annotated[int, typer.Option(help="Repetitions of part 1 (medians).", min=1)] = 5,
    quick: Annotated[
        bool, typer.Option("--quick", help="2 repetitions, 4 alternations, 8 long requests on a budget of 2.")
    ] = False,
) -> None:
    """Models as a fleet on the model-family fixtures (issue 20's targets): load on demand against load + warm
    request, 8 concurrent first requests loading once, a budget holding one of two models, admission by bytes."""
    import asyncio

    from mlxcluster.worker.blas import maybe_reexec_with_openblas

    maybe_reexec_with_openblas()
    from mlxcluster.bench.family_dirs import MissingFamilies, family_dirs
    from mlxcluster.bench.models import ModelsSettings, format_models, run_models

    settings = ModelsSettings.quick() if quick else ModelsSettings(repetitions=repetitions)
    try:
        paths = family_dirs(families_dir, settings.families())
    except MissingFamilies as missing:
        typer.echo(f"bench models: {missing}")
        return
    result = asyncio.run(run_models(paths, settings, quick=quick, parts=parts))
    typer.echo(result.to_json() if as_json else format_models(result))


@bench_app.command("embeddings")
def bench_embeddings(
    as_json: JsonOption = False,
    model: Annotated[
        Path | None,
        typer.Option(help="An embedding model dir (sentence-transformers files); default: the tiny fixture."),
    ] = None,
    families_dir: FamiliesDirOption = None,
    inputs: Annotated[int | None, typer.Option(help="Inputs embedded per step (default 512; quick 32).", min=1)] = None,
    quick: Annotated[bool, typer.Option("--quick", help="32 short inputs at concurrency 1 and 8 (seconds).")] = False,
    pyz: Annotated[
        Path | None, typer.Option(help="The zipapp whose size to report (default ./mlxcluster.pyz).")
    ] = None,
) -> None:
    """/v1/embeddings through a cluster (nats-server, controller, worker: each a process) at concurrency 1, 8 and 32
    against the same model in-process on batches of that size: inputs/s and tokens/s; the zipapp and the extra's
    sizes. Without --model, the tiny fixture built by python tests/embedding_model.py DIR under --families-dir."""
    import asyncio

    from mlxcluster.bench.embeddings import FIXTURE

    if model is None:
        if families_dir is None or not (families_dir / FIXTURE / "modules.json").is_file():
            typer.echo(
                "bench embeddings: not run: give --model DIR, or build the tiny fixture with "
                "python tests/embedding_model.py DIR and pass --families-dir DIR"
            )
            return
        model = families_dir / FIXTURE
    from mlxcluster.worker.blas import maybe_reexec_with_openblas

    maybe_reexec_with_openblas()
    from mlxcluster.bench.embeddings import format_embeddings, run_embeddings

    result = asyncio.run(run_embeddings(str(model), quick=quick, inputs=inputs, pyz=pyz))
    typer.echo(result.to_json() if as_json else format_embeddings(result))


@bench_app.command("group")
def bench_group(
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
    model: Annotated[str | None, typer.Option(help="Model dir (default: the demo model).")] = None,
    streams: Annotated[str, typer.Option(help="Concurrencies to measure.")] = "1,4",
    max_tokens: Annotated[int, typer.Option(help="Tokens per request.", min=2)] = 32,
    quick: Annotated[bool, typer.Option("--quick", help="One stream, 8 tokens (a couple of minutes).")] = False,
) -> None:
    """A worker group of 3 vs one worker on the same model: tokens/s, TTFT, each rank's peak RSS."""
    import asyncio

    import msgspec

    from mlxcluster.bench.group import format_table, run_group_bench
    from mlxcluster.models.demo import ensure_demo_model

    model_path = model or str(ensure_demo_model(get_config(config_path).models_dir))
    counts = (1,) if quick else tuple(int(n) for n in streams.split(",") if n.strip())
    result = asyncio.run(run_group_bench(model_path, streams=counts, max_tokens=8 if quick else max_tokens))
    typer.echo(msgspec.json.encode(result).decode() if as_json else format_table(result))


@bench_app.command("grammar")
def bench_grammar(
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
    model: Annotated[str | None, typer.Option(help="Model dir (default: the demo model).")] = None,
    streams: Annotated[int, typer.Option(help="Concurrent streams.", min=1)] = 8,
    max_tokens: Annotated[int, typer.Option(help="Tokens per request at most.", min=8)] = 64,
    quick: Annotated[bool, typer.Option("--quick", help="One round of 24 tokens, 8 schemas.")] = False,
    parts: Annotated[
        str,
        typer.Option(
            help="speed (compile and tokens/s on the model), strict (sampled outputs checked on every model-family "
            "fixture; needs --families-dir), or both: speed,strict."
        ),
    ] = "speed",
    strict_requests: Annotated[int, typer.Option(help="Sampled generations of the strict part.", min=1)] = 1000,
    families_dir: FamiliesDirOption = None,
) -> None:
    """Constrained decoding: schema compile p50 and tokens/s with vs without a JSON schema (N streams); strict JSON
    under sampling on the model-family fixtures (every finished output passes json.loads and its schema)."""
    import asyncio

    from mlxcluster.worker.blas import maybe_reexec_with_openblas

    maybe_reexec_with_openblas()
    names = {part.strip() for part in parts.split(",") if part.strip()}
    if not names or names - {"speed", "strict"}:
        raise typer.BadParameter(f"parts are speed and strict, not {parts!r}", param_hint="--parts")
    outputs: list[str] = []
    if "speed" in names:
        from mlxcluster.bench.grammar import format_table, run_grammar_bench
        from mlxcluster.models.demo import ensure_demo_model

        config = get_config(config_path)
        model_path = model or str(ensure_demo_model(config.models_dir))
        options = {"rounds": 1, "max_tokens": 24, "schemas": 8} if quick else {"max_tokens": max_tokens}
        result = asyncio.run(run_grammar_bench(model_path=model_path, streams=streams, **options))
        outputs.append(result.to_json() if as_json else format_table(result))
    if "strict" in names:
        from mlxcluster.bench.family_dirs import DEMO_FAMILY, RANDOM_FAMILIES, MissingFamilies, family_dirs
        from mlxcluster.bench.strict_json import format_strict, run_strict_json

        try:
            paths = family_dirs(families_dir, (*RANDOM_FAMILIES, DEMO_FAMILY))
        except MissingFamilies as missing:
            outputs.append(f"bench grammar --parts strict: {missing}")
        else:
            strict = asyncio.run(run_strict_json(paths, total=strict_requests, streams=streams))
            outputs.append(strict.to_json() if as_json else format_strict(strict))
    typer.echo("\n\n".join(outputs))


@bench_app.command("multiturn")
def bench_multiturn(
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
    quick: Annotated[bool, typer.Option(help="Fewer conversations and turns (a few minutes in all).")] = False,
    parts: Annotated[
        str,
        typer.Option(
            help="Parts to run: a (vs mlx_lm.server), b (balancers), c (the step budget: a running "
            "stream's gaps while a long prompt prefills), d (no cache help), e (cache byte bound), f (per "
            "model family vs mlx_lm.server; needs --families-dir)."
        ),
    ] = "abcde",
    families_dir: FamiliesDirOption = None,
) -> None:
    """Multi-turn conversations with a long system prompt: the prompt cache against mlx_lm.server and
    across balancers, the step budget against a long prompt's prefill, the cache's byte bound, and (part f)
    the prompt cache on each model family's fixture against mlx_lm.server."""
    import asyncio

    from mlxcluster.worker.blas import maybe_reexec_with_openblas

    maybe_reexec_with_openblas()  # part c runs the engine in-process, on the workers' BLAS
    from mlxcluster.bench.multiturn import run_multiturn
    from mlxcluster.bench.multiturn_format import format_multiturn
    from mlxcluster.models.demo import ensure_demo_model

    model_path = str(ensure_demo_model(get_config(config_path).models_dir))
    result = asyncio.run(run_multiturn(model_path, parts=parts, quick=quick, families_dir=families_dir))
    typer.echo(result.to_json() if as_json else format_multiturn(result))


@bench_app.command("scale")
def bench_scale(
    as_json: JsonOption = False,
    fleets: Annotated[str, typer.Option(help="Simulated fleet sizes.")] = "100,500,1000",
    window: Annotated[float, typer.Option(help="Seconds measured per fleet.", min=1)] = 10.0,
    interval_ms: Annotated[int, typer.Option(help="Heartbeat interval of the simulated workers.", min=100)] = 2000,
) -> None:
    """One controller with 100/500/1,000 simulated workers: CPU %, pick latency, heartbeat lag."""
    import asyncio

    from mlxcluster.bench.scale import format_table, run_scale_bench

    sizes = tuple(int(n) for n in fleets.split(",") if n.strip())
    result = asyncio.run(run_scale_bench(fleets=sizes, window_s=window, interval_ms=interval_ms))
    typer.echo(result.to_json() if as_json else format_table(result))


@bench_app.command("limits")
def bench_limits(
    as_json: JsonOption = False,
    rpm: Annotated[int, typer.Option(help="The key's requests per minute.", min=1)] = 600,
    clients: Annotated[int, typer.Option(help="Concurrent clients, split between the two controllers.", min=1)] = 64,
    seconds: Annotated[float, typer.Option(help="Seconds of load.", min=1)] = 60.0,
) -> None:
    """One key's rpm across two controllers: admitted per minute window, 429 headers, usage against 200s."""
    import asyncio

    from mlxcluster.bench.limits import format_table, run_limits_bench

    result = asyncio.run(run_limits_bench(rpm=rpm, clients=clients, seconds=seconds))
    typer.echo(result.to_json() if as_json else format_table(result))


@bench_app.command("soak")
def bench_soak(
    as_json: JsonOption = False,
    minutes: Annotated[float, typer.Option(help="How long to run.", min=0.1)] = 10.0,
    window: Annotated[float, typer.Option(help="Seconds per reported window.", min=5)] = 60.0,
    cache_full: Annotated[
        bool, typer.Option(help="One mlx worker on the demo model with its prompt cache kept full instead.")
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """Steady load at half capacity (echo workers): RSS growth, p50/p99 over time, errors."""
    import asyncio

    from mlxcluster.bench.soak import format_table, run_soak

    model_path = ""
    if cache_full:
        from mlxcluster.models.demo import ensure_demo_model

        model_path = str(ensure_demo_model(get_config(config_path).models_dir))
    result = asyncio.run(run_soak(minutes=minutes, window_s=window, cache_full=cache_full, model_path=model_path))
    typer.echo(result.to_json() if as_json else format_table(result))


@bench_app.command("faults")
def bench_faults(
    as_json: JsonOption = False,
    quick: Annotated[bool, typer.Option(help="One round of 30-token streams (about half a minute).")] = False,
    rounds: Annotated[int, typer.Option(help="Rounds (each a fresh cluster and one kill).", min=1)] = 3,
    tokens: Annotated[int, typer.Option(help="Tokens per stream.", min=10)] = 60,
) -> None:
    """kill -9 one of 3 echo workers under 100 streams: completed streams, detection time, migration latency."""
    import asyncio

    from mlxcluster.bench.faults import format_table, run_faults_bench

    if quick:
        rounds, tokens = 1, 30
    result = asyncio.run(run_faults_bench(rounds=rounds, tokens=tokens))
    typer.echo(result.to_json() if as_json else format_table(result))


@bench_app.command("report")
def bench_report(
    output: Annotated[Path, typer.Option(help="Markdown file to write.")] = Path("docs/BENCHMARKS.md"),
    soak_minutes: Annotated[float, typer.Option(help="Soak length in minutes (0 skips it).", min=0)] = 10.0,
    only: Annotated[
        str,
        typer.Option(
            help="Comma-separated sections (models, multiturn, multiturn-families, arrivals, grammar-strict, fuzz, "
            "step-budget, speculation, soak, soak-cache-full, ...) to rerun in the existing report."
        ),
    ] = "",
    quick: Annotated[bool, typer.Option(help="With --only: quick mode where a benchmark has one.")] = False,
    families_dir: FamiliesDirOption = None,
) -> None:
    """Run every benchmark and write the report (docs/BENCHMARKS.md)."""
    from mlxcluster.bench.report import refresh_sections, write_report

    def progress(line: str) -> None:
        typer.echo(line, err=True)

    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        refresh_sections(
            output, names, quick=quick, soak_minutes=soak_minutes, families_dir=families_dir, progress=progress
        )
    else:
        write_report(output, soak_minutes=soak_minutes, families_dir=families_dir, progress=progress)
