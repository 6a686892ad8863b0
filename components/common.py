"""Helpers shipped inside every component's source (KFP `additional_funcs`), so the pod needs
nothing from this package: only `erw` itself."""
from __future__ import annotations


def run_erw(argv: list) -> None:
    """Run one `erw` command in this process, echoing it so a user can rerun the step by hand."""
    import shlex
    import sys

    from erw.cli import main

    print("+ erw " + shlex.join(str(a) for a in argv), flush=True)
    code = main([str(a) for a in argv])
    if code:
        # erw has already printed the reason (ErwError) or the traceback above this line.
        sys.exit(f"erw {argv[0]} failed with exit code {code}; its own message is just above")


def launch_argv(
    erw_args: list,
    scheduler: str,
    image: str,
    nodes: int,
    procs_per_node: int,
    gpus_per_node: int,
    cpus_per_node: int,
    memory_gb_per_node: int,
    node_selector: dict,
    tolerations: list,
    s3_secret: str,
    queue: str,
    service_account: str,
    timeout: str,
    max_restarts: int,
    metrics_port: int,
    run_id: str,
) -> list:
    """`erw launch ...` arguments for one torchrun job of the pipeline."""
    argv = [
        "launch", "--scheduler", scheduler, "--image", image, "--nodes", nodes,
        "--procs-per-node", procs_per_node, "--gpus-per-node", gpus_per_node,
        "--cpus-per-node", cpus_per_node, "--memory-gb", memory_gb_per_node,
        "--queue", queue, "--timeout", timeout, "--max-restarts", max_restarts,
        "--metrics-port", metrics_port, "--run-id", run_id,
    ]
    for key, value in sorted(node_selector.items()):
        argv += ["--node-selector", f"{key}={value}"]
    for tol in tolerations:
        value = f"={tol['value']}" if tol.get("value") else ""
        effect = f":{tol['effect']}" if tol.get("effect") else ""
        argv += ["--toleration", f"{tol['key']}{value}{effect}"]
    if s3_secret:
        argv += ["--s3-secret", s3_secret]
    if service_account:
        argv += ["--service-account", service_account]
    return argv + ["--", *erw_args]


def publish_checkpoint(out: str, phase: str, pointer) -> str:
    """The shared tail of the training steps: find the run's final committed checkpoint under `out`,
    describe it in `pointer` (a KFP Model artifact: a small JSON file under the pipeline root, for
    lineage and the UI) and return its URI, which later steps receive as a plain string.

    The checkpoint itself stays where erw wrote it: as an artifact it would be copied into every
    consuming pod before the step starts (KFP launcher `downloadArtifacts`).
    """
    import json

    from erw import storage
    from erw.training.checkpoint import META, resolve_checkpoint

    final = resolve_checkpoint(out)
    meta = json.loads(storage.read_bytes(storage.join(final, META)))
    record = {"uri": final, "phase": phase, "step": meta["step"]}
    with open(pointer.path, "w") as f:
        json.dump(record, f)
    pointer.metadata.update(record)
    return final
