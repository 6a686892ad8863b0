"""Helpers shipped inside every component's source (KFP `additional_funcs`), so the pod needs
nothing from this package: only `erw` itself."""

from __future__ import annotations


def run_erw(argv: list) -> None:
    """Run one `erw` command in this process, echoing it so a user can rerun the step by hand."""
    import shlex
    import sys

    from erw.cli import main
    from erw.errors import PREEMPTED

    print("+ erw " + shlex.join(str(a) for a in argv), flush=True)
    code = main([str(a) for a in argv])
    if code == PREEMPTED:
        # Kept for a runner that passes it on (kfp.local, a shell); the KFP v2 launcher exits 1 on any
        # failure, so the message is what tells a preemption apart there.
        print(
            f"erw {argv[0]} was preempted (exit status {code}): the job checkpointed, and a retry of "
            "this step continues from the checkpoint",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(code)
    if code:
        # erw has already printed the reason (ErwError) or the traceback above this line.
        sys.exit(f"erw {argv[0]} failed with exit code {code}; its own message is just above")


def launch_spec(
    launch: dict,
    step: str,
    nodes: int,
    image: str,
    s3_secret: str,
    node_selector: dict,
    tolerations: list,
    run_id: str,
) -> dict:
    """The `erw launch --spec` value (erw.launch.LaunchSpec keys) of one training step: the pipeline's
    `launch` parameter plus what the pipeline sets itself (pipeline/params.py SET_BY_PIPELINE).

    KFP carries a dict parameter as a protobuf Struct, whose numbers are all doubles: 8 arrives as
    8.0. Whole numbers are turned back into ints, which LaunchSpec requires for counts and ports.
    """
    spec = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in launch.items()}
    return {
        **spec,
        "step": step,
        "nodes": int(nodes),
        "image": image,
        "s3_secret": s3_secret,
        "node_selector": node_selector,
        "tolerations": tolerations,
        "run_id": run_id,
    }


def run_training_job(spec: dict, erw_args: list, out: str, pointer) -> str:
    """The shared body of the warmup and train steps: run `erw <erw_args>` as a torchrun job
    (`erw launch --spec`), wait for it, then publish its final checkpoint (publish_checkpoint)."""
    import json

    run_erw(["launch", "--spec", json.dumps(spec, sort_keys=True), "--", *erw_args])
    return publish_checkpoint(out, spec["step"], pointer)


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


def warmup_location(config: str, overrides: list, dataset: str, workspace: str) -> str:
    """Where the warmup of these settings is written: <workspace>/warmup/<hash of what its result
    depends on> (not where it is written, nor phase 2's settings). The plan step checks it, the
    warmup step writes it, so both compute it here."""
    import hashlib
    import json

    from erw import storage
    from erw.config import load_config

    cfg = load_config(config, [*overrides, f"data.shards={dataset}"])
    sections = ("seed", "model", "encoder", "data", "objective", "warmup")
    settings = {k: v for k, v in cfg.to_dict().items() if k in sections}
    settings["warmup"] = {k: v for k, v in settings["warmup"].items() if k != "out"}
    settings["data"] = {k: v for k, v in settings["data"].items() if k != "source"}  # the shards say it all
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return storage.join(workspace, "warmup", key)


def finished_checkpoint(out: str, steps: int) -> str:
    """The committed checkpoint of step >= `steps` under `out`, or "" when the run has not finished
    (or its files were deleted since)."""
    from erw.training.checkpoint import list_checkpoints

    found = list_checkpoints(out)
    return found[-1][1] if found and found[-1][0] >= steps else ""
