"""Start the pipeline on a Kubeflow Pipelines server: one run, or a recurring run for retraining.

Arguments are validated here first. The same can be done with the plain KFP CLI:

    kfp --endpoint $KFP run submit -e erw -f pipeline.yaml workspace=s3://bucket/erw
    kfp --endpoint $KFP recurring-run create --experiment-name erw --job-name erw-weekly \\
        --cron-expression "0 0 3 * * 0" --max-concurrency 1 --no-catchup \\
        --pipeline-package-path pipeline.yaml workspace=s3://bucket/erw

The KFP CLI (2.17) JSON-parses each NAME=VALUE but checks nothing against the pipeline: no
unknown names, no world sizes, no placement. These functions validate every argument first, and
check that the server runs a KFP backend new enough for pipeline.yaml (MIN_BACKEND).

Schedules are in UTC on a standard install: KFP's scheduled-workflow controller evaluates the cron
expression in the zone of its CRON_SCHEDULE_TIMEZONE (backend/src/crd/controller/scheduledworkflow/
util/const.go:32-38), which the KFP manifests set from `cronScheduleTimezone: "UTC"`
(manifests/kustomize/base/installs/generic/pipeline-install-config.yaml:60, at 2.17.0).
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol

from pipeline.params import PipelineParamError, resolve

# KFP's cron (robfig/cron) has six fields, seconds first; each field: numbers, names, * ? / , -
CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-]+$")

# The oldest KFP backend that runs pipeline.yaml correctly, and why (read in kubeflow/pipelines):
# - 2.15.0: `optional: true` on Secret/ConfigMap env (backend/src/v2/driver/k8s.go:339-341, 435-437 at
#   2.15.0; 2.14.0 has no such code, and backend/src/common/util/json.go:74 DiscardUnknown). Older drivers
#   parse the Kubernetes config with DiscardUnknown and drop `optional`, so a pod whose Secret or
#   ConfigMap key is absent (IRSA: no Secret) fails with CreateContainerConfigError.
# - 2.14.0: dsl.Collected, the precompute fan-in (kubeflow/pipelines#11725).
MIN_BACKEND = (2, 15, 0)
VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


class BackendVersionError(PipelineParamError):
    """The KFP server is too old for pipeline.yaml, or does not say which version it runs."""


class KfpClient(Protocol):  # the part of kfp.Client used here
    def create_run_from_pipeline_func(self, pipeline_func: Any, **kwargs: Any) -> Any: ...
    def create_experiment(self, name: str, **kwargs: Any) -> Any: ...
    def create_recurring_run(self, experiment_id: str, job_name: str, **kwargs: Any) -> Any: ...


def connect(host: str, check_version: bool = True) -> KfpClient:
    """A kfp.Client for `host`, refused (BackendVersionError) when the backend is older than MIN_BACKEND."""
    import warnings

    import kfp

    with warnings.catch_warnings():  # "only works with v2.0.0-beta.2 and later": the check below is stricter
        warnings.filterwarnings("ignore", message="This client only works with", category=FutureWarning)
        client = kfp.Client(host=host or None)
    if check_version:
        check_backend_version(backend_version(client))
    return client


def backend_version(client: Any) -> str:
    """The server's release, `tag_name` of GET /apis/v2beta1/healthz (backend/src/apiserver/main.go,
    `healthzResponse`). kfp.Client's typed response drops that field, so the raw body is read, through
    the client's own connection (same host, credentials and cookies)."""
    response = client._healthz_api.healthz_service_get_healthz(_preload_content=False)
    return str(json.loads(response.data).get("tag_name", ""))


def check_backend_version(version: str) -> None:
    minimum = ".".join(map(str, MIN_BACKEND))
    match = VERSION.match(version)
    if not match:
        raise BackendVersionError(
            f"the KFP server does not say which release it runs (healthz tag_name={version!r}); pipeline.yaml needs "
            f"a KFP backend >= {minimum}. If you know it is, pass --skip-version-check."
        )
    found = tuple(int(g) for g in match.groups())
    if found < MIN_BACKEND:
        raise BackendVersionError(
            f"the KFP backend is {version}, but pipeline.yaml needs >= {minimum}: before 2.15 the driver drops "
            "`optional` from the Secret/ConfigMap env, so every step fails with CreateContainerConfigError where "
            "the erw-s3 Secret or a ConfigMap key is absent (IRSA). Upgrade Kubeflow Pipelines (README: Minimum versions)."
        )


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
