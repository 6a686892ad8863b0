"""The Kubeflow pipeline: the compiled spec, parameter validation, submit/schedule, promotion, and
(slow) the whole DAG run locally on the digits demo."""

import contextlib
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from erw.cli import build_parser, main
from erw.launch import LaunchSpec
from erw.launch.commands import spec_from_args
from erw.promote import PromoteError, promote_if_better
from pipeline.compile import PIPELINE_YAML, compile_pipeline
from pipeline.params import REPO, PipelineParamError, defaults, parse_cli_arguments, resolve
from pipeline.submit import check_cron, schedule, submit

STEPS = ("plan", "precompute", "merge", "warmup", "train", "evaluate", "promote", "gc")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp("kfp") / "pipeline.yaml")
    spec, platform = yaml.safe_load_all(path.read_text())
    return path, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_checked_in_pipeline_yaml_is_current(compiled):
    # Compared as data: the compiler's header comment prints map defaults in hash order.
    path, _, _ = compiled
    fresh, checked_in = (list(yaml.safe_load_all(p.read_text())) for p in (path, PIPELINE_YAML))
    assert checked_in == fresh, "pipeline.yaml is stale: run `erw pipeline compile`"


def test_dag_edges_and_fan_out(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    after = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    loop = next(name for name in tasks if name.startswith("for-loop"))
    assert after["plan"] == set()
    assert after[loop] == {"plan"}
    assert after["merge"] == {loop, "plan"}  # plan: the refresh token (a stale cache entry)
    assert after["warmup"] == {"merge", "plan"}
    assert after["train"] == {"merge", "warmup", "plan"}  # plan: continue mode's published model
    assert after["evaluate"] == {"train", "merge"}  # merge: the training data is the default reference
    assert after["promote"] == {"train", "evaluate"}
    assert after["gc"] == {"promote"}  # retention runs last
    # One precompute pod per work item that plan returns; merge collects every worker's output.
    assert tasks[loop]["parameterIterator"]["items"]["inputParameter"].endswith("plan-Output")
    assert "precompute" in spec["components"][tasks[loop]["componentRef"]["name"]]["dag"]["tasks"]
    assert tasks["merge"]["inputs"]["parameters"]["parts"]["taskOutputParameter"]["producerTask"] == loop


def test_caching_retries_and_names(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    loop = next(name for name in tasks if name.startswith("for-loop"))
    inner = spec["components"][tasks[loop]["componentRef"]["name"]]["dag"]["tasks"]["precompute"]
    by_step = {**{n: tasks[n] for n in STEPS if n in tasks}, "precompute": inner}
    cached = {n for n, t in by_step.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"precompute", "merge", "warmup"}
    for name, task in by_step.items():
        assert task["retryPolicy"]["maxRetryCount"] >= 1, name
        assert task["taskInfo"]["name"] != name, f"{name} has no display name"


def test_large_data_travels_as_uris_not_artifacts(compiled):
    """The KFP launcher downloads every input artifact into the pod before the step starts
    (launcher_v2.go:927-1000): steps downstream of the data get only parameters (URIs)."""
    _, spec, _ = compiled
    for step in ("warmup", "train", "evaluate", "promote"):
        inputs = spec["components"][f"comp-{step}"]["inputDefinitions"]
        assert "artifacts" not in inputs, f"{step} takes artifacts: {inputs['artifacts']}"
    for step in ("merge", "warmup", "train", "evaluate"):
        outputs = spec["components"][f"comp-{step}"]["outputDefinitions"]
        assert outputs["parameters"]["Output"]["parameterType"] == "STRING"  # the location
    # A component that sets artifact.uri points the launcher's upload outside the pipeline root
    # (objectstore/config.go:101-111), which fails the task on a cluster.
    sources = {p.name: p.read_text() for p in (REPO / "components").glob("*.py")}
    assert not {name for name, text in sources.items() if re.search(r"\.uri\s*=", text)}


def test_gpu_steps_request_an_accelerator_on_the_gpu_pool(compiled):
    _, spec, executors = compiled
    for step in ("precompute", "evaluate"):
        resources = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["resources"]
        assert resources["accelerator"]["resourceCount"] == "1"
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        platform = executors[f"exec-{step}"]
        assert "gpu_node_selector" in json.dumps(platform["nodeSelector"])
        assert "gpu_tolerations" in json.dumps(platform["tolerations"])
    for step in ("plan", "merge", "warmup", "train", "promote"):  # CPU pods: launchers and bookkeeping
        resources = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["resources"]
        assert "accelerator" not in resources and resources["resourceCpuLimit"] and resources["resourceMemoryLimit"]


def test_every_step_gets_s3_from_the_secret_and_labels(compiled):
    _, spec, executors = compiled
    for step in STEPS:
        platform = executors[f"exec-{step}"]
        (secret,) = platform["secretAsEnv"]
        assert {e["envVar"] for e in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert "s3_secret" in json.dumps(secret["secretNameParameter"])
        assert platform["podMetadata"]["labels"]["erw.dev/step"] == step
        assert platform["fieldPathAsEnv"][0]["name"] == "ERW_RUN_ID"
        image = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["image"]
        assert "image" in image  # the pipeline's `image` parameter, not a baked-in tag


def test_defaults_are_the_xl_recipe(compiled):
    _, spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    launch = params["launch"]["defaultValue"]
    assert params["config"]["defaultValue"] == "configs/imagenet256-sit-xl2.yaml"
    assert params["train_nodes"]["defaultValue"] * launch["procs_per_node"] >= 8
    assert launch["scheduler"] == "kubernetes"
    assert "defaultValue" not in params["image"] and not params["image"].get("isOptional")  # required
    # Schedulable on 96-vCPU GPU nodes once the kubelet's and daemonsets' share is reserved.
    assert launch["cpus_per_node"] <= 90
    assert launch["grace_period_s"] >= 300 and launch["pending_timeout"]


def test_the_launch_settings_are_one_parameter(compiled):
    """Issue 13: the training jobs' settings are the `launch` dict (LaunchSpec keys) plus the placement
    the GPU pods share; warmup and train take the same group and differ only in their node count."""
    _, spec, _ = compiled
    inputs = {
        step: set(spec["components"][f"comp-{step}"]["inputDefinitions"]["parameters"]) for step in ("warmup", "train")
    }
    group = {"launch", "nodes", "image", "s3_secret", "node_selector", "tolerations"}
    assert group <= inputs["warmup"] and group <= inputs["train"]
    assert inputs["train"] - inputs["warmup"] == {"warmup", "run_id", "continue_steps"}
    from erw.launch import LaunchSpec

    assert LaunchSpec.from_dict(defaults()["launch"]).max_restarts == 3


CLUSTER = {"image": "registry.example/erw:1"}  # the one required argument of a cluster run


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"image": ""}, "image is required for a cluster run: image=REGISTRY/erw:TAG"),
        ({"overrides": ["model.arch=SiT-XXL/2"]}, "model.arch='SiT-XXL/2' is not one of"),
        ({"train_nodes": 0}, "train_nodes must be at least 1, got 0"),
        ({"workspace": "s3://x/runs"}, "workspace='s3://x/runs' has no bucket"),
        ({"source": "s3:///imagenet"}, "source='s3:///imagenet' has no bucket"),
        ({"train_node": 2}, "unknown pipeline parameter 'train_node' (did you mean 'train_nodes'?)"),
        ({"workspace": "/data/erw"}, "is a local path, but the steps of a cluster run are separate pods"),
        ({"launch": {"procs_per_node": 16}}, "procs_per_node 16 exceeds gpus_per_node 8"),
        ({"launch": {"timeout": "soon"}}, "timeout 'soon' is not a positive duration"),
        ({"launch": {"max_restart": 1}}, "unknown launch spec key 'max_restart' (did you mean 'max_restarts'?)"),
        ({"launch": {"cpus_per_node": "90"}}, "cpus_per_node: expected an integer"),
        ({"launch": {"image": "x"}}, "launch.image is set by the pipeline parameter image"),
        ({"launch": {"grace_period_s": -1}}, "grace_period_s must be >= 0"),
        ({"gpu_tolerations": [{"effect": "NoSchedule"}]}, "is not a toleration"),
        ({"gpu_tolerations": [{"key": "gpu", "operator": "Exist"}]}, "operator must be Exists or Equal"),
        ({"gpu_tolerations": [{"key": "gpu", "effect": "NoSchedul"}]}, "effect must be one of"),
        ({"gpu_node_selector": {"pool": "a100 x"}}, "is not a label value"),
        ({"gpu_node_selector": {"bad key!": "a"}}, "is not a label key"),
        ({"train_nodes": "4"}, "train_nodes must be a int"),
        ({"retrain_mode": "resume"}, "retrain_mode must be one of scratch, continue, got 'resume'"),
        ({"keep_runs": 0}, "keep_runs must be at least 1, got 0"),
    ],
)
def test_bad_arguments_fail_before_anything_runs(arguments, message):
    with pytest.raises(PipelineParamError) as err:
        resolve({**CLUSTER, **arguments})
    assert message in str(err.value)


def test_launch_is_merged_key_by_key():
    args = resolve({**CLUSTER, **parse_cli_arguments(["launch.max_restarts=1", "launch.pending_timeout=1h"])})
    assert args["launch"] == {**defaults()["launch"], "max_restarts": 1, "pending_timeout": "1h"}


def test_world_size_problems_name_the_phase():
    # 256 images per batch cannot be split over 3 x 8 processes.
    with pytest.raises(PipelineParamError, match="train.batch_size=256 is not divisible by world size 24"):
        resolve({**CLUSTER, "train_nodes": 3})


def test_cli_arguments_are_typed():
    parsed = parse_cli_arguments(["train_nodes=8", 'overrides=["train.lr=2e-4"]', 'gpu_node_selector={"pool": "a100"}'])
    assert parsed == {"train_nodes": 8, "overrides": ["train.lr=2e-4"], "gpu_node_selector": {"pool": "a100"}}
    with pytest.raises(PipelineParamError, match="NAME=VALUE"):
        parse_cli_arguments(["train_nodes"])


class RecordingClient:
    def __init__(self):
        self.calls = []

    def create_run_from_pipeline_func(self, pipeline_func, **kwargs):
        self.calls.append(("run", pipeline_func, kwargs))
        return type("Run", (), {"run_id": "r-1"})()

    def create_experiment(self, name, **kwargs):
        self.calls.append(("experiment", name, kwargs))
        return type("Experiment", (), {"experiment_id": "e-1"})()

    def create_recurring_run(self, experiment_id, job_name, **kwargs):
        package = Path(kwargs["pipeline_package_path"])
        assert len(list(yaml.safe_load_all(package.read_text()))) == 2  # a real compiled package
        self.calls.append(("recurring", experiment_id, job_name, kwargs))
        return type("Job", (), {"recurring_run_id": "j-1"})()


def test_submit_sends_only_the_changed_arguments():
    client = RecordingClient()
    submit(
        client,
        {**CLUSTER, "train_nodes": 8, "warmup_nodes": 1},
        "erw",
        run_name="xl-8x8",
        service_account="pipeline-runner",
    )
    ((kind, func, kwargs),) = client.calls
    assert kind == "run" and func.name == "erw"
    assert kwargs["arguments"] == {**CLUSTER, "train_nodes": 8}  # warmup_nodes=1 is the default
    assert (kwargs["experiment_name"], kwargs["run_name"], kwargs["service_account"]) == (
        "erw",
        "xl-8x8",
        "pipeline-runner",
    )


def test_submit_refuses_bad_arguments_without_contacting_the_server():
    client = RecordingClient()
    with pytest.raises(PipelineParamError):
        submit(client, {"train_nodes": 0}, "erw")
    assert client.calls == []


def test_schedule_creates_a_non_overlapping_recurring_run():
    client = RecordingClient()
    schedule(client, {**CLUSTER, "train_nodes": 2}, "0 0 3 * * 0", "erw-weekly", "erw")
    (_, (kind, experiment_id, job_name, kwargs)) = client.calls
    assert (kind, experiment_id, job_name) == ("recurring", "e-1", "erw-weekly")
    assert kwargs["cron_expression"] == "0 0 3 * * 0"
    assert kwargs["max_concurrency"] == 1 and kwargs["no_catchup"] is True
    assert kwargs["params"] == {**CLUSTER, "train_nodes": 2}


def test_cron_needs_kfps_six_fields():
    with pytest.raises(PipelineParamError, match="did you mean '0 0 3 \\* \\* 0'"):
        check_cron("0 3 * * 0")
    with pytest.raises(PipelineParamError, match="6 fields"):
        check_cron("every sunday")
    assert check_cron("0 30 2 * * 1-5") == "0 30 2 * * 1-5"


def test_the_components_launch_spec_is_what_erw_launch_reads(tmp_path):
    """components/common.py builds the `erw launch --spec` value from the pipeline's parameters, as
    KFP hands them over (a Struct: every number a double); erw launch parses it into the same
    LaunchSpec the submit-time validation checked (pipeline/params.py launch_spec)."""
    from components.common import launch_spec
    from pipeline.params import launch_spec as validated_spec

    args = resolve(
        {
            **CLUSTER,
            "gpu_tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "pool", "operator": "Equal", "value": "h100", "effect": "NoExecute"},
            ],
        }
    )
    as_struct = {k: float(v) if isinstance(v, int) else v for k, v in args["launch"].items()}
    spec = launch_spec(
        as_struct,
        "train",
        4.0,
        args["image"],
        args["s3_secret"],
        args["gpu_node_selector"],
        args["gpu_tolerations"],
        "run-7",
    )
    argv = ["launch", "--spec", json.dumps(spec), "--", "train", "--config", "configs/demo.yaml", "--resume", "auto"]
    parsed, command = spec_from_args(build_parser().parse_args(argv))
    assert parsed.to_dict() == LaunchSpec.from_dict({**validated_spec(args, "train"), "run_id": "run-7"}).to_dict()
    assert (parsed.nodes, parsed.procs_per_node, parsed.cpus_per_node, parsed.max_restarts) == (4, 8, 90, 3)
    assert (parsed.step, parsed.run_id, parsed.grace_period_s, parsed.pending_timeout) == ("train", "run-7", 600, "30m")
    assert parsed.tolerations == args["gpu_tolerations"] and parsed.node_selector == args["gpu_node_selector"]
    assert command == ["train", "--config", "configs/demo.yaml", "--resume", "auto"]


# ---------------------------------------------------------------------------------------------
# Promotion gate.


def _metrics(tmp_path, name, fid):
    from tests.test_promote import metrics  # what `erw evaluate` writes, with the settings the gate compares

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**metrics(fid), "inception_score": 100.0}))
    return str(path)


def test_promotion_publishes_only_better_models(tmp_path):
    registry = str(tmp_path / "registry.json")
    first = promote_if_better("s3://b/run1/step-100", _metrics(tmp_path, "m1", 9.0), registry, run_id="run1")
    assert first.promoted and first.previous is None
    worse = promote_if_better("s3://b/run2/step-100", _metrics(tmp_path, "m2", 9.5), registry, run_id="run2")
    assert not worse.promoted and "fid 9.5 vs the published 9" in worse.message and "not better" in worse.message
    assert json.loads(Path(registry).read_text())["current"]["checkpoint"] == "s3://b/run1/step-100"
    tie = promote_if_better("s3://b/run3/step-100", _metrics(tmp_path, "m3", 9.0), registry)
    assert not tie.promoted  # only better by more than the margin replaces the published model
    better = promote_if_better("s3://b/run4/step-100", _metrics(tmp_path, "m4", 6.0), registry, run_id="run4")
    assert better.promoted
    saved = json.loads(Path(registry).read_text())
    assert saved["current"]["run_id"] == "run4" and saved["metric"] == "fid"
    assert [e["checkpoint"] for e in saved["history"]] == ["s3://b/run1/step-100", "s3://b/run4/step-100"]
    assert "| candidate | `s3://b/run4/step-100` | 6 |" in better.markdown()


def test_promotion_explains_unusable_inputs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"inception_score": 50.0}))
    with pytest.raises(PromoteError, match="has no finite 'fid' \\(has: inception_score\\)"):
        promote_if_better("ckpt", str(bad), str(tmp_path / "r.json"))
    with pytest.raises(PromoteError, match="does not exist"):
        promote_if_better("ckpt", str(tmp_path / "missing.json"), str(tmp_path / "r.json"))


def test_promote_cli(tmp_path, capsys):
    registry = tmp_path / "registry.json"
    rc = main(
        ["promote", "--checkpoint", "ckpt-a", "--metrics", _metrics(tmp_path, "a", 5.0), "--registry", str(registry)]
    )
    assert rc == 0 and "promoted ckpt-a" in capsys.readouterr().out
    assert json.loads(registry.read_text())["current"]["checkpoint"] == "ckpt-a"


# ---------------------------------------------------------------------------------------------
# The whole DAG on this machine.


# The demo's shipped alignment target by absolute path: these runs start in a temporary directory.
DEMO_ENCODER = Path(__file__).resolve().parents[1] / "configs" / "digits-encoder.safetensors"


@pytest.fixture(scope="module")
def digits_evaluator(tmp_path_factory):
    """A quickly trained digits classifier as the FID feature network: no Inception download offline."""
    import torch

    from erw.data.digits import digit_images
    from erw.evaluation.small_evaluator import fit_evaluator, save_evaluator
    from erw.models.small_nets import FitSettings

    from erw.config import load_config
    from pipeline.params import DEMO, REPO

    resolution = load_config(REPO / DEMO["config"]).data.resolution  # the demo's samples are this size
    images, labels = digit_images()
    pixels = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=resolution, mode="area"
    )
    net, _ = fit_evaluator(
        pixels.round().to(torch.uint8).contiguous(),
        torch.from_numpy(labels),
        FitSettings(steps=40, batch_size=64),
        log=lambda _: None,
    )
    path = tmp_path_factory.mktemp("evaluator") / "digits-evaluator.pt2"
    save_evaluator(net, str(path), resolution)
    return path


@pytest.mark.slow
def test_run_local_end_to_end_then_from_cache(tmp_path, monkeypatch, digits_evaluator):
    """The demo DAG on disk, every task held to the KFP backend's contract (tests/kfp_contract.py)."""
    from tests.kfp_contract import Backend
    from pipeline.local import run_local

    workspace = tmp_path / "pipeline"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    backend = Backend(local_root=workspace / "kfp-outputs", workspace=str(workspace))
    short = [
        "warmup.steps=20",
        "warmup.ckpt_every=10",
        "train.steps=20",
        "train.ckpt_every=10",
        "sample.num_samples=40",
        "sample.steps=10",
        "sample.batch_size=20",
        f"eval.feature_network={digits_evaluator}",
        f"encoder.weights={DEMO_ENCODER}",
    ]
    arguments = {"workspace": str(workspace), "overrides": short}
    with backend.enforce():
        first = run_local(arguments)
    evaluation = first.outputs["evaluation"]
    metrics = json.loads(Path(evaluation.metadata["metrics"]).read_text())
    assert math.isfinite(metrics["fid"]) and first.outputs["metrics"].metadata["fid"] == metrics["fid"]
    assert Path(evaluation.metadata["grid"]).stat().st_size > 0
    assert re.search(r"/step-0+20$", first.outputs["model"].metadata["uri"])
    assert "data:image/png;base64," in Path(first.outputs["report"].path).read_text()
    pointer = json.loads(Path(first.outputs["model"].path).read_text())  # the Model artifact: a pointer
    assert pointer == {"uri": first.outputs["model"].metadata["uri"], "phase": "train", "step": 20}
    assert first.outputs["dataset"].metadata["uri"].startswith(str(workspace / "latents"))
    assert backend.largest_input < 100_000  # manifest copy, pointer, metrics: kilobytes
    registry = json.loads((workspace / "registry.json").read_text())
    assert registry["current"]["checkpoint"] == first.outputs["model"].metadata["uri"]
    assert first.cached == []
    assert "checkpoint" in first.summary() and str(workspace) in first.summary()

    with backend.enforce():
        second = run_local(arguments)
    cached_steps = {re.sub(r"-iteration-\d+$", "", name) for name in second.cached}
    assert {"precompute", "merge", "warmup"} <= cached_steps, second.cached
    assert (
        "train" not in cached_steps
        and second.outputs["model"].metadata["uri"] != first.outputs["model"].metadata["uri"]
    )


@pytest.mark.slow
def test_run_local_writes_to_a_local_s3_endpoint(s3_bucket, tmp_path, monkeypatch, digits_evaluator):
    """The demo DAG with the workspace on S3 and the pipeline root on S3 in another bucket (KFP's own,
    as on a cluster): every artifact goes up to the root and comes back down for its consumer."""
    import boto3

    from erw import storage
    from tests.kfp_contract import Backend
    from pipeline.local import run_local

    workspace = f"{s3_bucket}/demo"
    boto3.client("s3").create_bucket(Bucket="mlpipeline")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    backend = Backend(
        local_root=tmp_path / "kfp" / "kfp-outputs", workspace=workspace, remote_root="s3://mlpipeline/v2/artifacts"
    )
    overrides = [
        "warmup.steps=10",
        "warmup.ckpt_every=10",
        "train.steps=10",
        "train.ckpt_every=10",
        "sample.num_samples=20",
        "sample.steps=5",
        "sample.batch_size=20",
        f"eval.feature_network={digits_evaluator}",
        f"encoder.weights={DEMO_ENCODER}",
    ]
    with backend.enforce():
        run = run_local({"workspace": workspace, "overrides": overrides}, use_cache=False, local_dir=tmp_path / "kfp")
    assert "promote" in backend.tasks
    model = run.outputs["model"].metadata["uri"]
    assert model.startswith(f"{workspace}/train/") and storage.exists(storage.join(model, "meta.json"))
    metrics = json.loads(storage.read_bytes(run.outputs["evaluation"].metadata["metrics"]))
    assert math.isfinite(metrics["fid"])
    assert json.loads(storage.read_bytes(f"{workspace}/registry.json"))["current"]["checkpoint"] == model


@pytest.mark.slow
def test_run_local_continue_mode_starts_from_the_published_model(tmp_path, monkeypatch, digits_evaluator):
    """A scratch run publishes; a continue run trains from that model without a warmup, records it,
    the gate decides against it, and the final gc step keeps the published lineage."""
    from erw.training import checkpoint as ckpt
    from pipeline.local import run_local

    workspace = tmp_path / "pipeline"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    short = [
        "warmup.steps=10",
        "warmup.ckpt_every=10",
        "train.steps=10",
        "train.ckpt_every=10",
        "sample.num_samples=40",
        "sample.steps=5",
        "sample.batch_size=20",
        f"eval.feature_network={digits_evaluator}",
        f"encoder.weights={DEMO_ENCODER}",  # the preset's path is relative to the repository
    ]
    first = run_local({"workspace": str(workspace), "overrides": short}, use_cache=False, local_dir=tmp_path / "k1")
    published = first.outputs["model"].metadata["uri"]
    assert json.loads((workspace / "registry.json").read_text())["current"]["checkpoint"] == published

    second = run_local(
        {"workspace": str(workspace), "overrides": short, "retrain_mode": "continue", "continue_steps": 4},
        use_cache=False,
        local_dir=tmp_path / "k2",
    )
    model = second.outputs["model"].metadata["uri"]
    continued = ckpt.load_checkpoint(model, with_train_state=False)
    assert continued.step == 4 and continued.meta["init_from"] == published  # started from, and recorded
    assert len(list((workspace / "warmup").glob("*"))) == 1  # no second warmup
    registry = json.loads((workspace / "registry.json").read_text())
    decided = [e["checkpoint"] for e in registry["history"]]
    assert decided[0] == published and (model in decided) == (registry["current"]["checkpoint"] == model)
    if model in decided:
        assert registry["current"]["lineage"]["started_from"] == published
    assert Path(published, "meta.json").exists()  # gc ran last and kept the lineage


# ---------------------------------------------------------------------------------------------
# The KFP server's version, read from a real HTTP endpoint.


@pytest.fixture
def kfp_server():
    """A tiny HTTP server answering GET /apis/v2beta1/healthz like the KFP API server
    (backend/src/apiserver/main.go, healthzResponse); `serve(tag)` sets the release it reports."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"tag_name": ""}

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] != "/apis/v2beta1/healthz":
                self.send_error(404)
                return
            body = json.dumps({"commit_sha": "abc", "tag_name": state["tag_name"], "multi_user": False}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def serve(tag: str) -> str:
        state["tag_name"] = tag
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    server.shutdown()


@pytest.mark.parametrize("tag", ["2.14.0", "2.2.0", "unknown", ""])
def test_submit_refuses_a_backend_older_than_2_15(kfp_server, tag, capsys, monkeypatch, tmp_path):
    from pipeline.submit import BackendVersionError, connect

    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client keeps a context file under ~/.config
    host = kfp_server(tag)
    with pytest.raises(BackendVersionError, match=">= 2.15.0"):
        connect(host)
    assert main(["pipeline", "submit", "--host", host, "image=erw:1"]) == 2
    assert "needs" in capsys.readouterr().err


@pytest.mark.parametrize("tag", ["2.15.0", "2.17.0", "v2.16.1"])
def test_submit_accepts_a_recent_backend(kfp_server, tag, monkeypatch, tmp_path):
    from pipeline.submit import backend_version, connect

    monkeypatch.setenv("HOME", str(tmp_path))
    client = connect(kfp_server(tag))
    assert backend_version(client) == tag


def test_pipeline_commands_work_from_an_installed_package(tmp_path):
    """H1: `erw pipeline compile|submit` from a pip-installed package (the image, a notebook), run in a
    directory that is not the checkout: presets come from the installed share/erw/configs, and
    compile writes to the working directory, never into site-packages."""
    import os
    import shutil
    import subprocess
    import sys

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("erw", "components", "pipeline", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip first uninstalls the erw of the environment running this test
    # (pip resolvelib factory: get_dist_to_uninstall), even though --prefix puts the new one elsewhere.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--ignore-installed",
            "--prefix",
            str(prefix),
            str(source),
        ],
        check=True,
        cwd=tmp_path,
    )
    (site,) = prefix.glob("lib/python*/site-packages")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    script = (
        "import pipeline, sys\n"
        "from erw.cli import main\n"
        "from pipeline.params import config_path, resolve\n"
        "print(pipeline.__file__)\n"
        "print(config_path('configs/imagenet256-sit-xl2.yaml'))\n"
        "resolve({'image': 'registry.example/erw:1'})\n"
        "sys.exit(main(['pipeline', 'compile']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    package, config, wrote = done.stdout.splitlines()[:3]
    assert Path(package).is_relative_to(site)  # the installed copy, not this checkout
    assert Path(config).is_relative_to(prefix / "share" / "erw" / "configs")
    assert wrote == "wrote pipeline.yaml" and (elsewhere / "pipeline.yaml").is_file()
    assert not list(site.glob("pipeline.yaml")) and not list(site.glob("*/pipeline.yaml"))


def test_a_local_run_leaves_print_as_it_found_it(capsys):
    # kfp.local's ParallelFor tasks run in threads, and each swaps builtins.print for an indenting
    # wrapper; interleaved, the last restore puts back the other thread's wrapper. Replay that
    # interleaving with kfp's own context manager inside the guard run_local uses.
    import builtins
    import sys

    from kfp.local.logging_utils import indented_print

    from pipeline.local import kfp_local_globals_restored

    before = builtins.print
    with kfp_local_globals_restored():
        first, second = indented_print(), indented_print()
        first.__enter__()
        second.__enter__()  # saves first's wrapper as "the original"
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)  # puts first's wrapper back
        assert builtins.print is not before, "the interleaving no longer leaks; the guard may be unneeded"
    assert builtins.print is before
    print("error line", file=sys.stderr)
    assert capsys.readouterr().out == ""


def test_a_local_run_leaves_no_handler_on_its_closed_console():
    # The same race in kfp.local's per-task logger setup: interleaved, the last exit puts back the
    # other task's handler, bound to the sys.stdout of that moment (a run's console, closed when the
    # run ends): every later log record then fails with "I/O operation on closed file".
    import io
    import logging

    from kfp.local.logging_utils import local_logger_context

    from pipeline.local import kfp_local_globals_restored

    root = logging.getLogger()
    before = root.handlers[:]
    console = io.StringIO()
    with kfp_local_globals_restored(), contextlib.redirect_stdout(console):
        first, second = local_logger_context(), local_logger_context()
        first.__enter__()
        second.__enter__()  # saves first's handler as one of "the originals"
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)  # puts first's handler back
        assert any(getattr(h, "stream", None) is console for h in root.handlers), "no longer leaks"
    console.close()
    assert root.handlers == before
