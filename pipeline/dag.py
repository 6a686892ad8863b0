"""The ERW pipeline DAG:

    plan -> precompute x N (ParallelFor) -> merge -> warmup -> train -> evaluate -> promote

GPU work happens in two places: the precompute and evaluate steps are single-GPU pods on the
GPU node pool, and the warmup and train steps are small CPU pods that launch torchrun jobs
(TorchX, Volcano) on that pool and wait for them. S3 credentials come from a Secret and the
endpoint from the `erw-defaults` ConfigMap (k8s/); neither is written into the pipeline spec.
"""

from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

from components.evaluate import evaluate
from components.gc import gc
from components.merge import merge
from components.plan import plan
from components.precompute import precompute
from components.promote import promote
from components.train import train
from components.warmup import warmup
from pipeline.params import PipelineArgs

D = PipelineArgs()  # defaults of every parameter below
CONFIG_MAP = "erw-defaults"  # k8s/base: S3 endpoint and region for every step
CONFIG_MAP_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# KFP labels every pod of a run with its id; erw reads ERW_RUN_ID to label metrics. The cached
# warmup step gets it only this way: as an input it would change the cache key on every run.
RUN_ID_ENV = "ERW_RUN_ID"
# The single-GPU steps' accelerator resource. A constant: kfp.local cannot resolve a parameter
# here inside a ParallelFor, and the pipeline must run unchanged on a laptop.
GPU_RESOURCE = "nvidia.com/gpu"
RUN_ID_LABEL = "pipeline/runid"


class Outputs(NamedTuple):
    """Small artifacts under the pipeline root, for lineage and the UI. The data they describe
    (latents, checkpoints, samples) stays in the workspace and moves between steps as URIs:
    the KFP launcher copies every input artifact into the consuming pod before it starts."""

    dataset: Dataset  # copy of the latents' manifest.json; metadata: uri, counts
    model: Model  # JSON pointer: {"uri": final checkpoint, "phase", "step"}
    evaluation: Artifact  # copy of metrics.json; metadata: uri, grid, samples
    metrics: Metrics
    report: HTML  # scores and the sample grid
    promotion: Markdown


def _step(
    task: dsl.PipelineTask, step: str, name: str, cpu: str, memory: str, retries: int, image, s3_secret
) -> dsl.PipelineTask:
    """Settings every step shares: image, name, resources, retries, S3 access, labels, the run id."""
    task.set_container_image(image).set_display_name(name)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
    kubernetes.use_secret_as_env(task, s3_secret, {k: k for k in SECRET_KEYS}, optional=True)  # IRSA needs none
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {k: k for k in CONFIG_MAP_KEYS}, optional=True)
    kubernetes.use_field_path_as_env(task, RUN_ID_ENV, f"metadata.labels['{RUN_ID_LABEL}']")
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "erw")
    kubernetes.add_pod_label(task, "erw.dev/step", step)
    return task


def _on_gpu_pool(task: dsl.PipelineTask, node_selector, tolerations) -> dsl.PipelineTask:
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    return task


@dsl.pipeline(
    name="erw",
    description="Latent diffusion transformer (SiT) trained with Embedded Representation Warmup: "
    "precompute latents, ERW warmup, full training, evaluation, promotion.",
)
def erw_pipeline(
    image: str,
    config: str = D.config,
    overrides: list = D.overrides,
    source: str = D.source,
    workspace: str = D.workspace,
    registry: str = D.registry,
    precompute_workers: int = D.precompute_workers,
    warmup_nodes: int = D.warmup_nodes,
    train_nodes: int = D.train_nodes,
    gpu_node_selector: dict = D.gpu_node_selector,
    gpu_tolerations: list = D.gpu_tolerations,
    s3_secret: str = D.s3_secret,
    launch: dict = D.launch,
    retrain_mode: str = D.retrain_mode,
    continue_steps: int = D.continue_steps,
    keep_runs: int = D.keep_runs,
) -> Outputs:
    planned = plan(
        config=config,
        overrides=overrides,
        source=source,
        workspace=workspace,
        precompute_workers=precompute_workers,
        warmup_nodes=warmup_nodes,
        train_nodes=train_nodes,
        launch=launch,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        retrain_mode=retrain_mode,
        registry=registry,
    ).set_caching_options(False)  # listing the source is how new data is noticed; it checks the cache's data
    _step(planned, "plan", "Plan: validate, fingerprint source, check cached data", "1", "4G", 2, image, s3_secret)

    with dsl.ParallelFor(planned.outputs["Output"], name="precompute-workers") as work:
        encoded = precompute(work=work, config=config, overrides=overrides, source=source)
        encoded.set_caching_options(True)
        _step(encoded, "precompute", "Precompute latents (one worker)", "8", "48G", 3, image, s3_secret)
        _on_gpu_pool(encoded, gpu_node_selector, gpu_tolerations)

    merged = merge(parts=dsl.Collected(encoded.output), refresh=planned.outputs["refresh_latents"])
    merged.set_caching_options(True)
    _step(merged, "merge", "Merge shards, write manifest", "1", "4G", 3, image, s3_secret)
    dataset = merged.outputs["Output"]  # the latents' location: a string, never an artifact

    # The training jobs' settings: the `launch` parameter plus the placement the GPU pods share.
    job = dict(
        config=config,
        overrides=overrides,
        workspace=workspace,
        launch=launch,
        image=image,
        s3_secret=s3_secret,
        node_selector=gpu_node_selector,
        tolerations=gpu_tolerations,
    )
    warm = warmup(
        dataset=dataset,
        nodes=warmup_nodes,
        refresh=planned.outputs["refresh_warmup"],
        start_from=planned.outputs["start_from"],
        **job,
    )
    warm.set_caching_options(True)
    _step(warm, "warmup", "Warmup (ERW phase 1, torchrun job)", "1", "2G", 1, image, s3_secret)

    trained = train(
        dataset=dataset,
        warmup=warm.outputs["Output"],
        nodes=train_nodes,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        start_from=planned.outputs["start_from"],
        continue_steps=continue_steps,
        **job,
    ).set_caching_options(False)
    _step(trained, "train", "Train (ERW phase 2, torchrun job)", "1", "2G", 1, image, s3_secret)

    scored = evaluate(
        checkpoint=trained.outputs["Output"],
        dataset=dataset,
        config=config,
        overrides=overrides,
        workspace=workspace,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_caching_options(False)
    _step(scored, "evaluate", "Evaluate: sample, FID", "8", "64G", 1, image, s3_secret)
    _on_gpu_pool(scored, gpu_node_selector, gpu_tolerations)

    gate = promote(
        checkpoint=trained.outputs["Output"],
        evaluation=scored.outputs["Output"],
        config=config,
        overrides=overrides,
        workspace=workspace,
        registry=registry,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_caching_options(False)
    _step(gate, "promote", "Promote if better", "1", "1G", 3, image, s3_secret)

    retention = gc(workspace=workspace, registry=registry, keep_runs=keep_runs).after(gate).set_caching_options(False)
    _step(retention, "gc", "Retention: delete old runs and unused latents", "1", "2G", 2, image, s3_secret)

    return Outputs(
        dataset=merged.outputs["manifest"],
        model=trained.outputs["checkpoint"],
        evaluation=scored.outputs["evaluation"],
        metrics=scored.outputs["metrics"],
        report=scored.outputs["report"],
        promotion=gate.outputs["summary"],
    )
