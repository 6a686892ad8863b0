"""Start the pipeline on a Kubeflow Pipelines server: one run, or a recurring run for retraining.

Arguments are validated here first. The same can be done with the plain KFP CLI:

    kfp --endpoint $KFP run submit -e erw -f pipeline.yaml workspace=s3://bucket/erw
    kfp --endpoint $KFP recurring-run create --experiment-name erw --job-name erw-weekly \\
        --cron-expression "0 0 3 * * 0" --max-concurrency 1 --no-catchup \\
        --pipeline-package-path pipeline.yaml workspace=s3://bucket/erw

The KFP CLI sends every value as a string and checks nothing; these functions type and validate.
"""
from __future__ import annotations

import re
from typing import Any, Protocol

from pipeline.params import PipelineParamError, resolve

# KFP's cron (robfig/cron) has six fields, seconds first; each field: numbers, names, * ? / , -
CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-]+$")


class KfpClient(Protocol):  # the part of kfp.Client used here
    def create_run_from_pipeline_func(self, pipeline_func: Any, **kwargs: Any) -> Any: ...
    def create_experiment(self, name: str, **kwargs: Any) -> Any: ...
    def create_recurring_run(self, experiment_id: str, job_name: str, **kwargs: Any) -> Any: ...


def connect(host: str) -> KfpClient:
    import kfp

    return kfp.Client(host=host or None)


def check_cron(expression: str) -> str:
    fields = expression.split()
    if len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields):
        raise PipelineParamError(
            f"--cron {expression!r} has 5 fields, but KFP's cron has 6 with seconds first: "
            f"did you mean '0 {expression}'?"
        )
    if len(fields) != 6 or not all(CRON_FIELD.match(f) for f in fields):
        raise PipelineParamError(
            f"--cron {expression!r} is not a cron expression of 6 fields (sec min hour day month weekday), "
            "e.g. '0 0 3 * * 0' for Sundays at 03:00"
        )
    return " ".join(fields)


def submit(
    client: KfpClient,
    arguments: dict[str, Any],
    experiment: str,
    run_name: str = "",
    service_account: str = "",
    namespace: str = "",
    enable_caching: bool | None = None,
) -> Any:
    """Create one run; returns KFP's result (with .run_id)."""
    from pipeline.dag import erw_pipeline

    args = resolve(arguments)
    return client.create_run_from_pipeline_func(
        erw_pipeline,
        arguments=_changed(args),
        run_name=run_name or None,
        experiment_name=experiment,
        namespace=namespace or None,
        service_account=service_account or None,
        enable_caching=enable_caching,
    )


def schedule(
    client: KfpClient,
    arguments: dict[str, Any],
    cron: str,
    job_name: str,
    experiment: str,
    service_account: str = "",
    namespace: str = "",
    max_concurrency: int = 1,
    catchup: bool = False,
) -> Any:
    """Create a recurring run. One at a time by default: retraining runs must not overlap."""
    import tempfile

    from pipeline.compile import compile_pipeline

    cron = check_cron(cron)
    if max_concurrency < 1:
        raise PipelineParamError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    args = resolve(arguments)
    experiment_id = client.create_experiment(name=experiment, namespace=namespace or None).experiment_id
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(f"{tmp}/pipeline.yaml")
        return client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=job_name,
            cron_expression=cron,
            max_concurrency=max_concurrency,
            no_catchup=not catchup,
            params=_changed(args),
            pipeline_package_path=str(package),
            service_account=service_account or None,
        )


def _changed(args: dict[str, Any]) -> dict[str, Any]:
    """Only the arguments that differ from the defaults: the run page then shows what was chosen."""
    from pipeline.params import defaults

    base = defaults()
    return {k: v for k, v in args.items() if v != base[k]}
