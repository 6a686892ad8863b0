"""Shared fixtures. Add yours below; keep each one small and documented."""

from __future__ import annotations

import contextlib
import uuid

import pytest
from tests.prometheus import free_port, start_stack


@pytest.fixture(autouse=True)
def print_and_logging_as_found():
    """Tests that run a ParallelFor through kfp.local directly (not through run_local) could leave
    builtins.print swapped for kfp's indenting wrapper, or a root-logger handler on a closed stream,
    for every later test (pipeline.local.kfp_local_globals_restored)."""
    from pipeline.local import kfp_local_globals_restored

    with kfp_local_globals_restored():
        yield


@pytest.fixture(scope="session")
def prometheus_stack(tmp_path_factory):
    """A real Prometheus + Pushgateway on free local ports (tests/prometheus.py)."""
    yield from start_stack(tmp_path_factory.mktemp("prometheus"))


# Credentials and settings the S3 fixtures put in the environment (boto3 reads them itself).
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_MAX_ATTEMPTS": "2",  # fail fast in the error tests
    "ERW_S3_RETRY_SECONDS": "2",  # the outage budget; the fault tests set their own
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe an instance role from a test
}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on 127.0.0.1: moto in server mode; boto3 talks HTTP to it.

    Sets AWS_ENDPOINT_URL and test credentials for the rest of the session (DataLoader
    workers and subprocesses inherit them). Yields the endpoint URL.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    patch = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        patch.delenv(name, raising=False)
    for name, value in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        patch.setenv(name, value)
    try:
        yield endpoint
    finally:
        patch.undo()
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the test endpoint, as 's3://NAME'."""
    import boto3

    name = f"erw-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def s3_auth_enforced(s3_endpoint):
    """Make the test endpoint check credentials (moto accepts any by default): unknown keys
    get InvalidAccessKeyId, as from a real S3."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    @contextlib.contextmanager
    def enforced():
        before = settings.INITIAL_NO_AUTH_ACTION_COUNT
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
        try:
            yield
        finally:
            settings.INITIAL_NO_AUTH_ACTION_COUNT = before

    return enforced


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> str:
    """The demo digits as a 32x32 ImageFolder on local disk (written once per session)."""
    from erw.data.digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(str(root))
    return str(root)


@pytest.fixture
def s3_proxy(s3_endpoint, monkeypatch):
    """The test endpoint behind a fault-injecting proxy (tests/s3proxy.py): boto3 talks to the
    proxy for the rest of the test, with an S3 retry budget of 30 s. Yields the FaultProxy."""
    from tests.s3proxy import FaultProxy

    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("ERW_S3_RETRY_SECONDS", "30")
        yield proxy
