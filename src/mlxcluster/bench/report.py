"""``mlxcluster bench report``: run every benchmark and write ``docs/BENCHMARKS.md`` (never by hand).

Each benchmark runs as its own ``mlxcluster bench ...`` subprocess, so one process's state (threads,
BLAS preload, caches) cannot colour another's figures; their text output is pasted verbatim. A section may end
with a ``### Notes`` block written by hand (a figure measured once by hand, say, and how): rerunning the section
keeps it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from mlxcluster.bench.stats import machine_line

NOTES_HEADING = "### Notes"
"""Starts the hand-written end of a section, which reruns keep."""


class Section(NamedTuple):
    """One section of the report: its heading, the ``mlxcluster bench`` arguments, what it measures."""

    title: str
    args: list[str]
    blurb: str
    key: str = ""
    """What ``bench report --only`` calls it (default: the benchmark's name)."""
    families: bool = False
    """It runs on the model-family fixtures (``--families-dir``)."""

    @property
    def name(self) -> str:
        return self.key or self.args[0]


SECTIONS: list[Section] = [
    Section("Message bus", ["nats"], "The embedded nats-server on loopback: start time, request/reply, publish rate."),
    Section("Engine", ["engine"], "The mlx engine in-process vs the same model behind one worker over NATS."),
    Section(
        "Step budget",
        ["engine", "--parts", "stall"],
        "The step budget's curve on the demo model (issue 21): per `worker.step_budget_ms`, a running stream's "
        "inter-token gaps while a ~2,000-token prompt prefills, against its gaps alone, and that prompt's TTFT "
        "against its TTFT on the idle engine (targets: gap p50 ≤ 3×, max ≤ 5×, TTFT ≤ 1.5×).",
        key="step-budget",
    ),
    Section(
        "Speculative decoding",
        ["engine", "--parts", "speculation"],
        "Prompt-lookup speculative decoding in the continuous batch (issue 21), greedy on the demo model: our "
        "cluster with `worker.speculative_tokens = 8` against the same with 0 and against `mlx_lm.server`'s plain "
        "decoding, all three up at once and taking turns: an edit workload (repeat a ~300-token code block with "
        "one function renamed; targets: 1 stream ≥ 1.8×, 8 streams ≥ 1.3× both, output identical) and distinct "
        "chat questions with nothing to look up (targets: speculation costs ≤ 3%; at 8 and 16 streams ≥ 1.05× "
        "`mlx_lm.server`).",
        key="speculation",
    ),
    Section(
        "Engine profile",
        ["engine", "--parts", "profile"],
        "Where the time of 8 concurrent streams goes (issue 21, item 3): CPU seconds per generated token of each "
        "process (controller, worker, nats-server) against `mlx_lm.server` on the same chats in the same run, "
        "speculation off on both sides, and the in-process generation thread under cProfile, by where its "
        "Python was.",
        key="engine-profile",
    ),
    Section(
        "Arriving requests",
        ["arrivals"],
        "8 streams decoding on the `qwen3_demo` fixture while requests arrive whose ~2,000-token tool-list prompt "
        "is already cached but whose forced tool is new: the running streams' inter-token gaps against no "
        "arrivals (issue 19's target: p99 ≤ 1.25×).",
        families=True,
    ),
    Section(
        "Models as a fleet",
        ["models"],
        "Issue 20's targets on the model-family fixtures, controller and one mlx worker (the real worker role, a "
        "catalogue, nothing loaded at start) in-process over the embedded nats-server: a first request that loads "
        "its model against an admin load plus a warm request (target ≤ 1.2×), 8 concurrent first requests "
        "loading once, a memory budget holding one of two models while requests alternate (every heartbeat's "
        "weights + prompt cache + KV within it, no failure), and 16 long requests admitted by projected KV bytes "
        "on a budget that holds 4.",
        families=True,
    ),
    Section(
        "Embeddings",
        ["embeddings"],
        "`/v1/embeddings` (issue 23) through nats-server, a controller and a worker, each its own process, at 1, 8 "
        "and 32 concurrent one-input requests, against the same model in-process on batches of that size (the "
        "worker's own forward and pooling, no bus): inputs/s and tokens/s (target at 32: ≥ 0.9× in-process), "
        "the zipapp's size and what the `embeddings` extra adds. Runs on the tiny fixture of the families dir "
        "unless `--model` names a real embedding model.",
        families=True,
    ),
    Section(
        "Cluster",
        ["cluster"],
        "Echo engine through controller + NATS against a bare aiohttp handler returning the same JSON (load "
        "from its own process), then the demo model side by side with `mlx_lm.server` on the same model dir.",
    ),
    Section("Scale", ["scale"], "One controller, simulated workers heartbeating (many per process)."),
    Section(
        "Limits across controllers",
        ["limits"],
        "Issue 22's target: a key made at runtime with `rpm = 600`, two controllers on one nats-server (JetStream), "
        "64 clients for 60 s on an echo worker: admitted per minute window (≤ 630), every 429's rate-limit "
        "headers, and the usage the cluster kept for the key against the count of 200s.",
    ),
    Section(
        "Faults",
        ["faults"],
        "kill -9 one of three echo workers under 100 concurrent streams: streams that still complete whole "
        "(moved mid-stream to another worker), the time to detect the dead worker, the latency a move adds.",
    ),
    Section(
        "Worker group",
        ["group", "--streams", "1,2", "--max-tokens", "16"],
        "A worker group of 3 (tensor parallel over the ring on loopback) against one worker, same model and "
        "prompts: tokens/s, TTFT and each process's peak RSS. On few cores a group is slower; it exists for "
        "models that do not fit one machine.",
    ),
    Section(
        "Constrained decoding",
        ["grammar"],
        "Schema compile p50/p95 (typical tool schemas, compiled on first use, then cached) and tokens/s of 8 "
        "concurrent streams in the in-process engine, unconstrained vs with a JSON schema, alternating rounds.",
    ),
    Section(
        "Strict JSON under sampling",
        ["grammar", "--parts", "strict"],
        "1,000 generations sampled at temperature 1 under `json_schema`, `json_object` and forced tool calls on "
        "every model-family fixture (in-process engines, batched): every finished output must pass strict "
        "`json.loads` and its schema.",
        key="grammar-strict",
        families=True,
    ),
    Section(
        "Engine fuzz",
        ["fuzz"],
        "2,000 random requests (sampling, `logit_bias`, stops, schemas, tools, reasoning, templates, continuations; "
        "invalid values among them) against five family-fixture engines at once, with injected faults: no engine "
        "may die, every request must end with Done or a request error.",
        families=True,
    ),
    Section(
        "Multi-turn",
        ["multiturn"],
        "Conversations with a long system prompt, every turn resending the history: the prompt cache against "
        "`mlx_lm.server` and across balancers, the decode stall of chunked prefill, concurrent distinct "
        "requests, and the cache's byte bound.",
    ),
    Section(
        "Prompt cache per model family",
        ["multiturn", "--parts", "f"],
        "A multi-turn chat on each model-family fixture (Gemma 3's sliding window, Qwen3-Next's hybrid "
        "attention, the plain-KV families) through mlxcluster and through `mlx_lm.server` on the same model dir: "
        "the later turns' cached share, side by side (issue 19's target: ours ≥ theirs).",
        key="multiturn-families",
        families=True,
    ),
]
QUICK = {"multiturn", "cluster", "arrivals", "fuzz", "models", "embeddings"}
"""Benchmarks that take ``--quick``."""


def run_section(args: list[str], timeout_s: float) -> str:
    """One benchmark's text output (or its failure, stated as such)."""
    command = [sys.executable, "-m", "mlxcluster", "bench", *args]
    started = time.monotonic()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"(did not finish within {timeout_s:.0f} s)"
    took = f"\n\n(ran in {time.monotonic() - started:.0f} s: `mlxcluster bench {' '.join(args)}`)"
    if out.returncode != 0:
        return f"FAILED with exit code {out.returncode}:\n{out.stderr.strip()[-2000:]}{took}"
    return out.stdout.strip() + took


def soak_sections(soak_minutes: float) -> list[Section]:
    if soak_minutes <= 0:
        return []
    minutes = ["--minutes", str(soak_minutes), "--window", "60"]
    return [
        Section("Soak", ["soak", *minutes], "Steady load at half capacity; RSS and latency per minute."),
        Section(
            "Soak, prompt cache full",
            ["soak", "--cache-full", *minutes],
            "One mlx worker whose prompt cache is kept full (each request a distinct long prompt, so each "
            "stores an entry and evicts one); RSS per minute.",
            key="soak-cache-full",
        ),
    ]


def section_args(section: Section, *, quick: bool = False, families_dir: Path | None = None) -> list[str]:
    """The ``mlxcluster bench`` arguments of ``section``: ``--quick`` where it has one, the fixtures' dir."""
    args = [*section.args, "--quick"] if quick and section.args[0] in QUICK else list(section.args)
    if section.families and families_dir is not None:
        args += ["--families-dir", str(families_dir)]
    return args


def _timeout(args: list[str], soak_minutes: float) -> float:
    if args[0] == "soak":
        return soak_minutes * 60 + 600
    long = args[0] in ("multiturn", "arrivals", "fuzz") or {"strict", "stall", "speculation"} & set(args)
    return 1800 if long else 900


def _load() -> str:
    load = os.getloadavg()
    text = "load average " + " / ".join(f"{x:.1f}" for x in load) + " (1/5/15 min) at its start"
    if load[0] > (os.cpu_count() or 1):
        text += " — more runnable work than cores: other jobs shared the machine, so figures are noisy"
    return text


def write_report(
    path: Path,
    *,
    soak_minutes: float,
    families_dir: Path | None = None,
    progress: Callable[[str], None] = print,
) -> None:
    """Run every section and write the report; the notes of the report it replaces are kept."""
    sections = list(SECTIONS) + soak_sections(soak_minutes)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    parts = [
        "# Benchmarks\n",
        f"Generated by `make bench` (`mlxcluster bench report`) on {machine_line()}.",
        "All processes (load generator, controller, workers, nats-server) share this one machine, so figures are",
        "best read as ratios within one run. Nothing here is edited by hand, except a section's closing",
        f"`{NOTES_HEADING}`, which `bench report` keeps when it reruns the section.\n",
    ]
    for section in sections:
        args = section_args(section, families_dir=families_dir)
        progress(f"bench {args[0]}...")
        load = _load()
        output = run_section(args, timeout_s=_timeout(args, soak_minutes))
        parts += [f"## {section.title}\n", f"{section.blurb} ({load}.)\n", "```", output, "```\n"]
        notes = section_notes(old, section.title)
        if notes:
            parts.append(notes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    progress(f"wrote {path}")


def refresh_sections(
    path: Path,
    only: list[str],
    *,
    quick: bool,
    soak_minutes: float,
    families_dir: Path | None = None,
    progress: Callable[[str], None] = print,
) -> None:
    """Run only the sections named in ``only`` and replace them in the existing report (the rest stays as it
    was, and so do their notes); each says that it was refreshed alone, how, on what and under what load."""
    sections = [s for s in list(SECTIONS) + soak_sections(soak_minutes) if s.name in only]
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    for section in sections:
        args = section_args(section, quick=quick, families_dir=families_dir)
        progress(f"bench {' '.join(args)}...")
        load = _load()
        output = run_section(args, timeout_s=_timeout(args, soak_minutes))
        command = f"mlxcluster bench report --only {section.name}{' --quick' if quick else ''}"
        if args[0] == "soak":
            command += f" --soak-minutes {soak_minutes:g}"
        if section.families and families_dir is not None:
            command += f" --families-dir {families_dir}"
        note = f"Refreshed alone by a {'quick ' if quick else ''}run (`{command}`) on "
        body = f"{section.blurb}\n\n{note}{machine_line()}, {load}.\n\n```\n{output}\n```\n"
        text = replace_section(text, section.title, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    progress(f"wrote {path}")


def _section_lines(lines: list[str], title: str) -> tuple[int, int] | None:
    """(first body line, end) of the ``## title`` section in ``lines``, or None."""
    heading = f"## {title}\n"
    if heading not in lines:
        return None
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start, end


def section_notes(text: str, title: str) -> str:
    """The ``### Notes`` block that ends the ``## title`` section of ``text`` ("" when it has none)."""
    lines = text.splitlines(keepends=True)
    found = _section_lines(lines, title)
    if found is None:
        return ""
    start, end = found
    first = next((i for i in range(start, end) if lines[i].startswith(NOTES_HEADING)), end)
    return "".join(lines[first:end]).rstrip("\n") + "\n" if first < end else ""


def replace_section(text: str, title: str, body: str) -> str:
    """``text`` with the ``## title`` section's body replaced by ``body`` (appended when absent); the section's
    notes stay after the new body."""
    lines = text.splitlines(keepends=True)
    found = _section_lines(lines, title)
    if found is None:
        return text.rstrip("\n") + f"\n\n## {title}\n\n{body}"
    start, end = found
    notes = section_notes(text, title)
    body = body + ("\n" + notes if notes else "")
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + "\n" + body + ("\n" + tail if tail else "")
