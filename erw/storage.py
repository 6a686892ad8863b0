"""One small interface over local paths and s3://bucket/prefix URIs.

S3 goes through boto3: the endpoint comes from AWS_ENDPOINT_URL and credentials from the
usual chain (environment, profile, web identity, instance role), both read by boto3 itself.

S3 rides out blips. Every operation is retried through errors that go away by themselves
(HTTP 5xx, SlowDown and other throttling, connection refused or reset, timeouts) with
exponential backoff and full jitter, for up to ERW_S3_RETRY_SECONDS (default 120 s: an endpoint
restart, a load-balancer failover). A streaming read that stops delivering bytes for
ERW_S3_STALL_SECONDS (default 10 s) is abandoned and reopened at the same offset, pinned to
the object's ETag. An outage longer than the budget ends in one StorageError that says so;
a multipart upload that fails is aborted (configure an AbortIncompleteMultipartUpload
lifecycle rule on the bucket for uploads whose abort could not reach the endpoint either).
Every failure a user can fix (missing bucket or object, no or rejected credentials, denied
request, unreachable endpoint, a malformed URI) surfaces as one StorageError that says what is
wrong and what to do.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import random
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

from erw.errors import ErwError

# How long S3 operations keep retrying transient errors, and how long a read may stall.
RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS = "ERW_S3_RETRY_SECONDS", 120.0
STALL_SECONDS_ENV, DEFAULT_STALL_SECONDS = "ERW_S3_STALL_SECONDS", 10.0
BACKOFF_FIRST, BACKOFF_CAP = 0.2, 8.0  # seconds: 0.2, 0.4, ... capped, times a uniform jitter
# botocore's own quick retries inside each of our attempts (AWS_MAX_ATTEMPTS overrides).
DEFAULT_MAX_ATTEMPTS = 3
# Shards are hundreds of MB: upload them in parallel 64 MiB parts (S3 allows 10,000 parts).
MULTIPART_CHUNK = 64 * 1024 * 1024
MULTIPART_CONCURRENCY = 8
STREAM_BUFFER = 1024 * 1024
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_THROTTLING = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "TooManyRequests",
}
_jitter = random.Random()  # private: never touches the training RNGs
T = TypeVar("T")


class StorageError(ErwError):
    """A storage operation failed; the message says what and how to fix it."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The file or object does not exist (also catchable as FileNotFoundError)."""


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the listed directory/prefix, "/"-separated
    size: int
    version: str = ""  # changes when the content does: the S3 ETag, or the local mtime in ns
    modified: float = 0.0  # last modification, Unix seconds


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "/".join([uri.rstrip("/")] + [p.strip("/") for p in parts])
    return str(Path(uri, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not _S3_BUCKET.match(bucket):
        raise StorageError(f"{uri!r} has no valid bucket name: use s3://BUCKET/prefix")
    return bucket, key


def check_uri(uri: str, setting: str) -> None:
    """Refuse a location that would silently go somewhere else than meant.

    A local path, or s3://BUCKET[/prefix]. Anything else that looks like a URI (`s3:/bucket`
    with one slash, `S3://`, `s3://` alone, `gs://...`) would otherwise be taken for a local
    relative path and fill a folder named `s3:` on the pod's disk.
    """
    if not uri:
        raise StorageError(f"{setting} is empty: set it to a local path or s3://BUCKET/prefix")
    if is_s3(uri):
        if not uri[len("s3://") :].strip("/"):
            raise StorageError(f"{setting}={uri!r} names no bucket: use s3://BUCKET/prefix")
        split_s3(uri)
        return
    scheme = _SCHEME.match(uri)
    if scheme:
        name = scheme.group(1)
        if name.lower() == "s3":
            fixed = "s3://" + uri[len(name) + 1 :].lstrip("/")
            raise StorageError(f"{setting}={uri!r} is not an S3 URI (write it {fixed!r}) nor a local path")
        raise StorageError(
            f"{setting}={uri!r}: the scheme {name!r} is not supported; use a local path or s3://BUCKET/prefix"
        )


def check_writable(uri: str, setting: str) -> None:
    """Before any compute: the location is well formed and a small object can be written there
    and deleted (credentials, bucket, endpoint, permissions, a read-only disk)."""
    check_uri(uri, setting)
    probe = join(uri, f".erw-write-check-{uuid.uuid4().hex[:12]}")
    created = None if is_s3(uri) else _first_missing(Path(uri))
    try:
        write_bytes(probe, b"erw write check")
        delete(probe)
        if created is not None:  # leave no trace: a refused command must not create its output folder
            shutil.rmtree(created, ignore_errors=True)
    except StorageError as err:
        raise StorageError(f"{setting}={uri} cannot be written: {err}") from None
    except OSError as err:
        raise StorageError(f"{setting}={uri} cannot be written: {err.strerror or err}") from None


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of path that does not exist yet (None when path exists)."""
    missing = None
    for folder in [path, *path.absolute().parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing


def retry_seconds() -> float:
    return float(os.environ.get(RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS))


def stall_seconds() -> float:
    return float(os.environ.get(STALL_SECONDS_ENV, DEFAULT_STALL_SECONDS))


# ---------------------------------------------------------------------------------------------
# The boto3 client and the translation of its errors into messages a user can act on.

_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    STALL_SECONDS_ENV,
)


def _client(writes: bool = False):
    # One client per process and environment: boto3 clients are not fork-safe (DataLoader
    # workers fork), and tests switch endpoints and credentials through the environment.
    # Reads time out after ERW_S3_STALL_SECONDS without a byte; writes wait longer for the
    # response, which a server sends only once it has stored the whole body.
    return _cached_client(os.getpid(), tuple(os.environ.get(name) for name in _CLIENT_ENV), writes)


@functools.lru_cache(maxsize=8)
def _cached_client(pid: int, env: tuple[str | None, ...], writes: bool):
    import boto3
    from botocore.config import Config

    retries = {
        "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
        "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)),
    }
    read_timeout = max(60.0, stall_seconds()) if writes else stall_seconds()
    config = Config(
        retries=retries,
        connect_timeout=min(10.0, stall_seconds()),
        read_timeout=read_timeout,
        max_pool_connections=32,
    )
    return boto3.session.Session().client("s3", config=config)


def _endpoint() -> str:
    return _client().meta.endpoint_url


def _error_code(err: BaseException) -> str:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _unwrap(err: BaseException) -> BaseException:
    from boto3.exceptions import S3UploadFailedError

    if isinstance(err, S3UploadFailedError) and err.__context__ is not None:
        return err.__context__  # the ClientError of the failed part or PutObject
    return err


def is_transient(err: BaseException) -> bool:
    """An error that a retry a little later may not see: 5xx, throttling, a broken connection."""
    from http.client import HTTPException

    from botocore import exceptions as bx
    from urllib3 import exceptions as ux

    err = _unwrap(err)
    if isinstance(err, bx.ClientError):
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or _error_code(err) in _THROTTLING
    return isinstance(
        err,
        (
            bx.HTTPClientError,
            bx.ConnectionError,
            bx.IncompleteReadError,
            ux.HTTPError,
            HTTPException,
            ConnectionError,
            TimeoutError,
        ),
    )


def _translate(err: BaseException, uri: str, action: str) -> StorageError | None:
    """A StorageError for a boto3/botocore failure, or None when it is not one."""
    from botocore import exceptions as bx

    err = _unwrap(err)
    if isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return StorageError(
            f"cannot {action} {uri}: no S3 credentials found. Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or mount the S3 secret into the pod)"
        )
    if isinstance(err, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)):
        return StorageError(
            f"cannot {action} {uri}: the S3 endpoint {_endpoint()} cannot be reached ({err}). "
            "Check AWS_ENDPOINT_URL and the network"
        )
    if not isinstance(err, bx.ClientError):
        if isinstance(err, bx.BotoCoreError) or is_transient(err):
            return StorageError(f"cannot {action} {uri}: {err}")
        return None
    code = _error_code(err)
    bucket = split_s3(uri)[0]
    if code == "NoSuchBucket":
        return StorageError(
            f"cannot {action} {uri}: bucket {bucket!r} does not exist at {_endpoint()}. "
            "Create it or fix the URI (and AWS_ENDPOINT_URL)"
        )
    if code in ("NoSuchKey", "404", "NotFound"):
        return ObjectNotFound(f"{uri} does not exist")
    if code == "PreconditionFailed":
        return StorageError(f"{uri} was replaced while it was being read; retry when the writer is done")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
        return StorageError(
            f"cannot {action} {uri}: the S3 endpoint {_endpoint()} rejected the credentials ({code}). "
            "Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the S3 secret) for this endpoint"
        )
    if code in ("AccessDenied", "403", "AllAccessDisabled", "Forbidden"):
        return StorageError(
            f"cannot {action} {uri}: access denied. The credentials need s3:ListBucket, s3:GetObject, "
            f"s3:PutObject and s3:DeleteObject on bucket {bucket!r}; check the IAM policy and the bucket policy"
        )
    message = err.response.get("Error", {}).get("Message", "")
    return StorageError(f"cannot {action} {uri}: S3 error {code}: {message}".rstrip(": "))


def _fail(err: BaseException, uri: str, action: str, retried: float | None = None) -> BaseException:
    """The exception to raise for err: translated, one line, saying how long it was retried."""
    translated = _translate(err, uri, action)
    if translated is None:
        return err
    if retried is not None:
        message = " ".join(str(translated).split())
        translated = type(translated)(
            f"{message} [retried for {retried:.0f} s, the budget {RETRY_SECONDS_ENV}={retry_seconds():g}; "
            "raise it to ride out longer S3 outages]"
        )
    return translated


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number attempt (0-based): exponential, capped, full jitter."""
    return min(BACKOFF_CAP, BACKOFF_FIRST * 2**attempt) * _jitter.random()


def retrying(uri: str, action: str, call: Callable[[], T], deadline: float | None = None) -> T:
    """call() until it succeeds, retrying transient S3 errors until the deadline (monotonic
    seconds; default: ERW_S3_RETRY_SECONDS from now). Other errors are translated at once."""
    started = time.monotonic()
    deadline = started + retry_seconds() if deadline is None else deadline
    attempt = 0
    while True:
        try:
            return call()
        except StorageError:
            raise
        except Exception as err:
            now = time.monotonic()
            if not is_transient(err):
                raise _fail(err, uri, action) from err
            if now >= deadline:
                raise _fail(err, uri, action, retried=now - started) from err
            time.sleep(min(backoff(attempt), deadline - now))
            attempt += 1


@contextlib.contextmanager
def _local_errors(uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise ObjectNotFound(f"{uri} does not exist") from None
    except PermissionError:
        raise StorageError(f"cannot {action} {uri}: permission denied") from None
    except IsADirectoryError:
        raise StorageError(f"cannot {action} {uri}: it is a directory, not a file") from None


# ---------------------------------------------------------------------------------------------
# Reading.


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as stream:
        return stream.read()


def open_read(uri: str) -> BinaryIO:
    """A readable binary stream. S3 objects stream (nothing is downloaded up front); a
    connection that breaks or stalls mid-object is reopened at the same offset."""
    if is_s3(uri):
        return io.BufferedReader(_S3Stream(uri), buffer_size=STREAM_BUFFER)
    with _local_errors(uri, "read"):
        return open(uri, "rb")


class _S3Stream(io.RawIOBase):
    """GetObject body that resumes with a Range request (pinned to the same ETag) on a broken
    or stalled read, for up to ERW_S3_RETRY_SECONDS of failures in a row."""

    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.pos = 0
        self.etag: str | None = None
        self.body = self._open()

    def _open(self, deadline: float | None = None):
        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            kwargs.update(Range=f"bytes={self.pos}-", IfMatch=self.etag)
        response = retrying(self.uri, "read", lambda: _client().get_object(**kwargs), deadline)
        self.etag = response.get("ETag", self.etag)
        return response["Body"]

    def readable(self) -> bool:
        return True

    def readall(self) -> bytes:
        chunks = []
        # The default would read 8 KiB at a time; a failed read is redone from its start, so
        # reads of STREAM_BUFFER bound what a broken connection costs.
        while chunk := self.read(STREAM_BUFFER):
            chunks.append(chunk)
        return b"".join(chunks)

    def readinto(self, buffer) -> int:
        started = deadline = None
        attempt = 0
        while True:
            try:
                data = self.body.read(len(buffer))
                break
            except Exception as err:
                if not is_transient(err):
                    raise _fail(err, self.uri, "read") from err
                now = time.monotonic()
                if deadline is None:
                    started, deadline = now, now + retry_seconds()
                if now >= deadline:
                    raise _fail(err, self.uri, f"read (at byte {self.pos})", retried=now - started) from err
                time.sleep(min(backoff(attempt), deadline - now))
                attempt += 1
                with contextlib.suppress(Exception):
                    self.body.close()
                self.body = self._open(deadline)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self.body.close()
        super().close()


def download_file(uri: str, local_path: str | Path) -> None:
    """Copy one object or file to a local path (parallel ranged GETs for large S3 objects)."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3(uri)
        config = TransferConfig(multipart_chunksize=MULTIPART_CHUNK, max_concurrency=MULTIPART_CONCURRENCY)
        retrying(uri, "download", lambda: _client().download_file(bucket, key, str(local_path), Config=config))
        return
    with _local_errors(uri, "copy"):
        shutil.copyfile(uri, local_path)


def download_tree(uri: str, local_dir: str | Path) -> list[str]:
    """Copy every file below a directory/prefix into local_dir; returns the relative paths."""
    files = list_files(uri)
    if not files:
        raise ObjectNotFound(f"{uri} is empty or does not exist")
    for info in files:
        download_file(join(uri, info.path), Path(local_dir, info.path))
    return [info.path for info in files]


# ---------------------------------------------------------------------------------------------
# Writing. Local writes go through a temporary name and a rename; an S3 object only appears
# once its (multipart) upload completes. Either way a reader never sees half a file.


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        retrying(uri, "write", lambda: _client(writes=True).put_object(Bucket=bucket, Key=key, Body=data))
        return
    path = Path(uri)
    with _local_errors(uri, "write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:  # e.g. a full disk: leave no torn temporary file behind
            tmp.unlink(missing_ok=True)
            raise


def upload_file(local_path: str | Path, uri: str) -> None:
    """Copy a local file to uri; large files go to S3 as a parallel multipart upload."""
    if is_s3(uri):
        if os.path.getsize(local_path) <= MULTIPART_CHUNK:
            write_bytes(uri, Path(local_path).read_bytes())
        else:
            _multipart_upload(Path(local_path), uri)
        return
    path = Path(uri)
    with _local_errors(uri, "write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, path)


def _multipart_upload(local_path: Path, uri: str) -> None:
    """Parts in parallel, each retried on its own; on failure the upload is aborted, so no
    invisible, billed parts stay behind."""
    bucket, key = split_s3(uri)
    client = _client(writes=True)
    size = local_path.stat().st_size
    upload_id = retrying(uri, "upload to", lambda: client.create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]

    def send(number: int) -> dict:
        with open(local_path, "rb") as f:
            f.seek((number - 1) * MULTIPART_CHUNK)
            data = f.read(MULTIPART_CHUNK)
        response = retrying(
            uri,
            "upload to",
            lambda: client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data),
        )
        return {"ETag": response["ETag"], "PartNumber": number}

    try:
        with ThreadPoolExecutor(MULTIPART_CONCURRENCY) as pool:
            parts = list(pool.map(send, range(1, -(-size // MULTIPART_CHUNK) + 1)))
        retrying(
            uri,
            "upload to",
            lambda: client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ),
        )
    except BaseException as err:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        # A completion whose response was lost: the retry is told NoSuchUpload, the object is there.
        if _error_code(getattr(err, "__cause__", None) or err) == "NoSuchUpload" and _size(uri) == size:
            return
        raise


def _size(uri: str) -> int | None:
    bucket, key = split_s3(uri)
    with contextlib.suppress(Exception):
        return int(_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return None


# ---------------------------------------------------------------------------------------------
# Listing and deleting.


def exists(uri: str) -> bool:
    """True for an existing file/object or a non-empty directory/prefix."""
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)

    def check() -> bool:
        client = _client()
        if key and not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as err:
                if _error_code(err) not in ("404", "NoSuchKey", "NotFound"):
                    raise
        prefix = key.rstrip("/") + "/" if key else ""
        return client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0

    return retrying(uri, "check", check)


def list_dir(uri: str) -> list[str]:
    """Names of the direct children of a directory/prefix (files and sub-directories), sorted."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""

        def listing() -> set[str]:
            names = set()
            for page in (
                _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            ):
                names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
                names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
            return names

        return sorted(retrying(uri, "list", listing))
    path = Path(uri)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def list_files(uri: str) -> list[FileInfo]:
    """Every file below a directory/prefix, recursively, sorted by relative path.

    One paginated listing on S3 (1,000 keys per request), not one request per folder.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""

        def listing() -> list[FileInfo]:
            found = []
            for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found += [
                    FileInfo(
                        o["Key"][len(prefix) :],
                        int(o["Size"]),
                        o.get("ETag", "").strip('"'),
                        o["LastModified"].timestamp(),
                    )
                    for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")
                ]
            return found

        return sorted(retrying(uri, "list", listing), key=lambda f: f.path)
    root = Path(uri)
    if not root.is_dir():
        return []
    with _local_errors(uri, "list"):
        found = [
            FileInfo(p.relative_to(root).as_posix(), stat.st_size, str(stat.st_mtime_ns), stat.st_mtime)
            for p in root.rglob("*")
            if p.is_file()
            for stat in [p.stat()]
        ]
    return sorted(found, key=lambda f: f.path)


def delete(uri: str) -> None:
    """Delete one file or object (nothing if it does not exist)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        retrying(uri, "delete", lambda: _client(writes=True).delete_object(Bucket=bucket, Key=key))
        return
    with _local_errors(uri, "delete"):
        Path(uri).unlink(missing_ok=True)


def delete_tree(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/"

        def remove() -> None:
            client = _client(writes=True)
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objs:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": objs})

        retrying(uri, "delete", remove)
        return
    shutil.rmtree(uri, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Conditional writes: compare-and-swap for small shared files (a registry, a settings claim).
# S3 evaluates If-None-Match / If-Match atomically on PutObject; locally an exclusive lock on
# a sidecar file makes the compare and the replace one step (the lock is advisory: only
# writers that go through here respect it).


def read_versioned(uri: str) -> tuple[bytes, str]:
    """(content, version) of a small file; pass the version to write_if to replace exactly it."""
    if is_s3(uri):
        bucket, key = split_s3(uri)

        def get() -> tuple[bytes, str]:
            response = _client().get_object(Bucket=bucket, Key=key)
            return response["Body"].read(), response["ETag"].strip('"')

        return retrying(uri, "read", get)
    with _local_errors(uri, "read"):
        data = Path(uri).read_bytes()
    return data, _local_version(data)


def write_if(uri: str, data: bytes, version: str | None) -> bool:
    """Write uri only if it still holds `version` (None: only if it does not exist).

    False when another writer got there first: read again, redo the change, retry.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": f'"{version}"'}
        try:
            retrying(
                uri, "write", lambda: _client(writes=True).put_object(Bucket=bucket, Key=key, Body=data, **condition)
            )
            return True
        except StorageError as err:
            if _error_code(err.__cause__) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                return False
            raise
    import fcntl

    path = Path(uri)
    with _local_errors(uri, "write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = _local_version(path.read_bytes()) if path.exists() else None
            if current != version:
                return False
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return True


def _local_version(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()
