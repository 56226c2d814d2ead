"""``mlxcluster run``: start a node (controller, worker or dual); flags become environment overrides."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from mlxcluster.cli.common import ConfigOption, fail, get_config


def run_command(
    config_path: ConfigOption = None,
    mode: Annotated[
        str | None, typer.Option("--mode", "-m", help="controller | worker | dual (default: cluster.mode).")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-n", min=1, help="Worker processes in dual mode.")] = 1,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="Controller processes sharing the HTTP port (default: min(cores, 4) on Linux, 1 in dual mode).",
        ),
    ] = None,
    engine: Annotated[str | None, typer.Option(help="Worker engine: mlx | echo.")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model dir, a name in the models dir, or a Hugging Face repo id ORG/NAME[@REV] (from the HF cache, "
            "downloaded first if missing)."
        ),
    ] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1, help="Requests a worker serves at once.")] = None,
    port: Annotated[int | None, typer.Option(help="Controller HTTP port.")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow an API or embedded NATS open beyond loopback without credentials.")
    ] = False,
    group: Annotated[
        str | None, typer.Option("--group", help="Worker: join the worker group NAME that shards one model.")
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option("--group-size", min=1, help="Members of the worker group (dual: workers per local group)."),
    ] = None,
    parallel: Annotated[
        str | None, typer.Option("--parallel", help="How a group splits the model: tensor | pipeline.")
    ] = None,
    no_shared_state: Annotated[
        bool,
        typer.Option(
            "--no-shared-state",
            help="Controller: keys and usage per controller, not in NATS JetStream (runs on a NATS without -js).",
        ),
    ] = False,
) -> None:
    """Start a node: controller, worker, or dual (embedded NATS + controller + workers)."""
    import msgspec

    from mlxcluster.errors import CANNOT_START, NodeError
    from mlxcluster.logsetup import configure_logging
    from mlxcluster.roles import run_node
    from mlxcluster.startup import exit_node

    if mode is not None and mode not in ("controller", "worker", "dual"):
        fail(f"--mode: expected controller, worker or dual, got {mode!r}")
    # Flags are environment overrides, so dual mode's children inherit them.
    inherited_mode = os.environ.get("MLXCLUSTER_CLUSTER_MODE")
    flags = {
        "WORKER_ENGINE": engine,
        "WORKER_MODEL": model,
        "WORKER_MAX_CONCURRENT": max_concurrent,
        "CONTROLLER_PORT": port,
        "CONTROLLER_PROCESSES": processes,
        "CONTROLLER_INSECURE": "true" if insecure else None,
        "NATS_EMBEDDED_INSECURE": "true" if insecure else None,
        "WORKER_GROUP_NAME": group,
        "WORKER_GROUP_SIZE": group_size,
        "WORKER_GROUP_PARALLEL": parallel,
        "CONTROLLER_SHARED_STATE": "false" if no_shared_state else None,
    }
    for key, value in flags.items():
        if value is not None:
            os.environ[f"MLXCLUSTER_{key}"] = str(value)
    if config_path is not None:
        os.environ["MLXCLUSTER_CONFIG"] = str(config_path.resolve())
    config = get_config(config_path)
    role = mode or config.cluster.mode
    if role == "worker" and config.worker.engine == "mlx":
        from mlxcluster.worker.blas import maybe_reexec_with_openblas

        maybe_reexec_with_openblas()  # Linux CPU fast path; returns when not applicable
    if role not in ("controller", "worker", "dual"):
        fail(f"--mode: expected controller, worker or dual, got {role!r}")
    configure_logging(config.logging, role=role)
    # The node's mode (what status reports): the role run here, except that the children of a dual node (their
    # --mode names the role they run) keep `dual`, which they inherit from the supervisor's environment.
    node_mode = "dual" if inherited_mode == "dual" else role
    config = msgspec.structs.replace(config, cluster=msgspec.structs.replace(config.cluster, mode=node_mode))
    os.environ["MLXCLUSTER_CLUSTER_MODE"] = node_mode
    try:
        code = run_node(config, role, workers=workers)
    except NodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        code = CANNOT_START  # bad setting, busy port: restarting would not help
    exit_node(code)
