"""The KFP backend's contract (tests/kfp_contract.py) on toy components that break each rule, and on
the pipeline's real encoding steps. The whole demo DAG runs under it in tests/test_pipeline.py (slow)."""

import json
import shutil
from pathlib import Path

import pytest
from kfp import dsl, local
from kfp.dsl import Dataset, Input, Output

from tests.kfp_contract import INPUT_BUDGET, Backend, ContractViolation, key_from_uri

TOY_IMAGE = "python:3.12"  # never pulled: the subprocess runner uses this environment


@dsl.component(base_image=TOY_IMAGE, install_kfp_package=False)
def points_outside(out: Output[Dataset], elsewhere: str):
    import os

    os.makedirs(elsewhere, exist_ok=True)
    open(os.path.join(elsewhere, "data"), "w").write("x")
    out.uri = elsewhere  # what today's merge/warmup/train/evaluate do


@dsl.component(base_image=TOY_IMAGE, install_kfp_package=False)
def writes_to_cwd(out: Output[Dataset]):
    open("scratch-the-next-step-needs.txt", "w").write("lost with the pod")
    open(out.path, "w").write("ok")


@dsl.component(base_image=TOY_IMAGE, install_kfp_package=False)
def big_output(out: Output[Dataset], size: int):
    with open(out.path, "wb") as f:
        f.write(b"\0" * size)


@dsl.component(base_image=TOY_IMAGE, install_kfp_package=False)
def reads(data: Input[Dataset]) -> int:
    import os

    return os.path.getsize(data.path)


@dsl.pipeline
def big_input(size: int) -> int:
    return reads(data=big_output(size=size).outputs["out"]).output


@dsl.pipeline
def small_round_trip() -> int:
    return reads(data=big_output(size=1000).outputs["out"]).output


@pytest.fixture
def kfp_local(tmp_path, monkeypatch):
    """kfp.local with its root in tmp_path/root, run from an empty working directory tmp_path/cwd."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    root = tmp_path / "root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    return root


def test_key_from_uri_is_the_backends():
    # objectstore/config.go:101-111 with PrefixedBucket() = scheme + path.Join(bucket, prefix)
    assert key_from_uri("s3://mlpipeline/v2/artifacts", "s3://mlpipeline/v2/artifacts/erw/run/merge/dataset") == (
        "erw/run/merge/dataset"
    )
    with pytest.raises(ContractViolation, match="does not have expected bucket prefix"):
        key_from_uri("s3://mlpipeline/v2/artifacts", "s3://erw-runs/latents/identity-32px")
    with pytest.raises(ContractViolation, match="empty key"):
        key_from_uri("s3://mlpipeline/v2/artifacts", "s3://mlpipeline/v2/artifacts/")


def test_an_output_uri_outside_the_root_is_refused(kfp_local, tmp_path):
    with Backend(local_root=kfp_local, workspace=str(tmp_path / "ws")).enforce():
        with pytest.raises(ContractViolation, match="not under the pipeline root"):
            points_outside(elsewhere=str(tmp_path / "ws" / "latents"))


def test_an_output_uri_outside_the_remote_root_is_refused(kfp_local, s3_bucket):
    root = f"{s3_bucket}/v2/artifacts"
    with Backend(local_root=kfp_local, workspace=f"{s3_bucket}/ws", remote_root=root).enforce():
        with pytest.raises(ContractViolation, match="does not have expected bucket prefix"):
            points_outside(elsewhere="s3://erw-runs/latents")


def test_a_file_written_outside_the_outputs_is_refused(kfp_local, tmp_path):
    with Backend(local_root=kfp_local, workspace=str(tmp_path / "ws")).enforce():
        with pytest.raises(ContractViolation, match="scratch-the-next-step-needs.txt, outside its declared outputs"):
            writes_to_cwd()


def test_a_large_input_artifact_is_refused(kfp_local, tmp_path):
    with Backend(local_root=kfp_local, workspace=str(tmp_path / "ws")).enforce() as backend:
        with pytest.raises(ContractViolation, match="would be downloaded into the step's pod"):
            big_input(size=INPUT_BUDGET + 1)
    assert backend.tasks == ["big-output"]  # the consumer never ran


def test_artifacts_travel_through_the_remote_root(kfp_local, s3_bucket):
    from erw import storage

    root = f"{s3_bucket}/v2/artifacts"
    with Backend(local_root=kfp_local, workspace=f"{s3_bucket}/ws", remote_root=root).enforce() as backend:
        task = small_round_trip()
    assert task.output == 1000  # the consumer read the copy downloaded from the root
    assert backend.tasks == ["big-output", "reads"]
    (uploaded,) = [f for f in storage.list_files(root) if f.path.endswith("/out")]
    assert uploaded.size == 1000


@pytest.fixture
def few_digits(digits_folder, tmp_path):
    """Two classes, eight images each: the encoding steps in seconds."""
    out = tmp_path / "digits"
    for label in sorted(p.name for p in Path(digits_folder).iterdir() if p.is_dir())[:2]:
        (out / label).mkdir(parents=True)
        for image in sorted((Path(digits_folder) / label).iterdir())[:8]:
            shutil.copy(image, out / label / image.name)
    return str(out)


def _encoding_pipeline(config: str, source: str, workspace: str):
    """plan -> precompute x 2 -> merge: the real components, wired as in pipeline/dag.py."""
    from components.merge import merge
    from components.plan import plan
    from components.precompute import precompute
    from pipeline.params import DEMO

    @dsl.pipeline
    def encode() -> Dataset:
        planned = plan(
            config=config,
            overrides=[],
            source=source,
            workspace=workspace,
            precompute_workers=2,
            warmup_nodes=1,
            train_nodes=1,
            launch=DEMO["launch"],
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            retrain_mode="scratch",
            registry="",
        ).set_caching_options(False)
        with dsl.ParallelFor(planned.outputs["Output"]) as work:
            encoded = precompute(work=work, config=config, overrides=[], source=source)
        return merge(parts=dsl.Collected(encoded.output), refresh=planned.outputs["refresh_latents"]).outputs[
            "manifest"
        ]

    return encode


def test_the_encoding_steps_meet_the_contract(kfp_local, tmp_path, few_digits):
    from pipeline.params import REPO

    workspace = str(tmp_path / "ws")
    encode = _encoding_pipeline(str(REPO / "configs/demo.yaml"), few_digits, workspace)
    with Backend(local_root=kfp_local, workspace=workspace).enforce() as backend:
        manifest = encode().output
    assert [t.split("-iteration")[0] for t in backend.tasks] == ["plan", "precompute", "precompute", "merge"]
    assert backend.largest_input <= INPUT_BUDGET
    assert json.loads(Path(manifest.path).read_text())["num_samples"] == 16  # the copy, under the root
    assert manifest.metadata["uri"].startswith(workspace)


@pytest.mark.slow  # three runs of the encoding steps, about a minute
def test_a_stale_cache_entry_is_rebuilt_not_trusted(tmp_path, monkeypatch, few_digits):
    """Issue 12 item 6: KFP cache entries never expire. After the latents are deleted, the cached
    precompute and merge results point at nothing; the plan step (never cached) notices and gives
    them a new cache key, so they run again and the manifest exists when the run ends."""
    from pipeline.params import REPO

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    root = tmp_path / "root"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=True,
        cache_root=str(tmp_path / "cache"),
    )
    workspace = str(tmp_path / "ws")
    encode = _encoding_pipeline(str(REPO / "configs/demo.yaml"), few_digits, workspace)

    def run() -> tuple[str, set[str]]:
        """(the latents' location, the steps that executed: a cache hit never reaches the dispatcher)"""
        with Backend(local_root=root, workspace=workspace).enforce() as backend:
            uri = encode().output.metadata["uri"]
        return uri, {t.split("-iteration")[0] for t in backend.tasks}

    first, executed = run()
    assert executed == {"plan", "precompute", "merge"}
    again, executed = run()
    assert again == first and executed == {"plan"}  # data present: the cache serves the rest
    shutil.rmtree(first)
    rebuilt, executed = run()
    assert rebuilt == first and executed == {"plan", "precompute", "merge"}
    assert (Path(first) / "manifest.json").is_file()


def test_plan_hands_out_a_new_refresh_token_only_for_what_is_gone(tmp_path, few_digits):
    """The plan step's check, in-process: a new token (the run id) for missing latents or a missing
    finished warmup checkpoint; for what exists, the token it was built with (same cache key)."""
    from components.common import warmup_location
    from components.plan import plan
    from erw.config import load_config
    from pipeline.params import DEMO, REPO

    config, workspace = str(REPO / "configs/demo.yaml"), str(tmp_path / "ws")

    def planned(run_id):
        return plan.python_func(
            config=config,
            overrides=[],
            source=few_digits,
            workspace=workspace,
            precompute_workers=2,
            warmup_nodes=1,
            train_nodes=1,
            launch=DEMO["launch"],
            run_id=run_id,
            retrain_mode="scratch",
            registry="",
        )

    work, latents, warm, _ = planned("run-1")
    assert (latents, warm) == ("run-1", "run-1") and [w["refresh"] for w in work] == ["run-1", "run-1"]
    dataset = work[0]["dataset"]
    Path(dataset).mkdir(parents=True)
    (Path(dataset) / "manifest.json").write_text("{}")  # run-1 built the latents
    steps = load_config(config).warmup.steps
    unfinished = Path(warmup_location(config, [], dataset, workspace)) / "step-00000010"
    unfinished.mkdir(parents=True)
    (unfinished / "meta.json").write_text("{}")
    assert planned("run-2")[1:3] == ("run-1", "run-2")  # a checkpoint, but not the last one
    finished = unfinished.with_name(f"step-{steps:08d}")
    finished.mkdir()
    (finished / "meta.json").write_text("{}")  # run-2 finished the warmup
    assert planned("run-3")[1:3] == ("run-1", "run-2")
    shutil.rmtree(dataset)
    assert planned("run-4")[1:3] == ("run-4", "run-2")


def test_precompute_pushes_to_the_pushgateway_the_config_names(prometheus_stack, tmp_path, few_digits, monkeypatch):
    """F3: with overrides=[metrics.pushgateway=HOST:PORT] the precompute step pushes its results (the
    dashboard's batch-step row); checked on a real Pushgateway."""
    import urllib.request

    from components.plan import plan
    from components.precompute import precompute
    from pipeline.params import DEMO, REPO

    monkeypatch.setenv("ERW_RUN_ID", "run-f3")
    config, overrides = str(REPO / "configs/demo.yaml"), [f"metrics.pushgateway={prometheus_stack.pushgateway}"]
    (work,), _, _, _ = plan.python_func(
        config=config,
        overrides=overrides,
        source=few_digits,
        workspace=str(tmp_path / "ws"),
        precompute_workers=1,
        warmup_nodes=1,
        train_nodes=1,
        launch=DEMO["launch"],
        run_id="run-f3",
        retrain_mode="scratch",
        registry="",
    )
    precompute.python_func(work=work, config=config, overrides=overrides, source=few_digits)
    exposed = urllib.request.urlopen(f"http://{prometheus_stack.pushgateway}/metrics", timeout=10).read().decode()
    (line,) = [
        x for x in exposed.splitlines() if x.startswith("erw_precompute_images_total{") and 'run_id="run-f3"' in x
    ]
    assert line.endswith(" 16")
