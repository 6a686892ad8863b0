"""One small interface over local paths and s3://bucket/prefix URIs.

S3 goes through boto3: the endpoint comes from AWS_ENDPOINT_URL and credentials from the
usual chain (environment, profile, web identity, instance role), both read by boto3 itself.
Requests are retried with backoff ("adaptive" mode, which also rate-limits on throttling);
AWS_MAX_ATTEMPTS and AWS_RETRY_MODE override the defaults. Every failure that a user can
fix (missing bucket or object, no or rejected credentials, denied request, unreachable
endpoint) surfaces as one StorageError that says what is wrong and what to do.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from erw.errors import ErwError

DEFAULT_MAX_ATTEMPTS = 8
# Shards are hundreds of MB: upload them in parallel 64 MiB parts (S3 allows 10,000 parts).
MULTIPART_CHUNK = 64 * 1024 * 1024
MULTIPART_CONCURRENCY = 8
# A streaming read that breaks mid-object is reopened at the same offset this many times.
STREAM_REOPEN_ATTEMPTS = 5
STREAM_BUFFER = 1024 * 1024


class StorageError(ErwError):
    """A storage operation failed; the message says what and how to fix it."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The file or object does not exist (also catchable as FileNotFoundError)."""


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the listed directory/prefix, "/"-separated
    size: int


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "/".join([uri.rstrip("/")] + [p.strip("/") for p in parts])
    return str(Path(uri, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if len(bucket) < 3:
        raise StorageError(f"{uri!r} has no valid bucket name: use s3://BUCKET/prefix")
    return bucket, key


# ---------------------------------------------------------------------------------------------
# The boto3 client and the translation of its errors into messages a user can act on.

_CLIENT_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)


def _client():
    # One client per process and environment: boto3 clients are not fork-safe (DataLoader
    # workers fork), and tests switch endpoints and credentials through the environment.
    return _cached_client(os.getpid(), tuple(os.environ.get(name) for name in _CLIENT_ENV))


@functools.lru_cache(maxsize=8)
def _cached_client(pid: int, env: tuple[str | None, ...]):
    import boto3
    from botocore.config import Config

    retries = {
        "mode": os.environ.get("AWS_RETRY_MODE", "adaptive"),
        "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)),
    }
    config = Config(retries=retries, connect_timeout=10, read_timeout=60, max_pool_connections=32)
    return boto3.session.Session().client("s3", config=config)


def _endpoint() -> str:
    return _client().meta.endpoint_url


def _error_code(err: BaseException) -> str:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _translate(err: BaseException, uri: str, action: str) -> StorageError | None:
    """A StorageError for a boto3/botocore failure, or None when it is not one."""
    from boto3.exceptions import S3UploadFailedError
    from botocore import exceptions as bx

    if isinstance(err, S3UploadFailedError) and err.__context__ is not None:
        err = err.__context__  # the ClientError of the failed part or PutObject
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
        if isinstance(err, bx.BotoCoreError):
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
            f"cannot {action} {uri}: access denied. The credentials need s3:ListBucket, s3:GetObject "
            f"and s3:PutObject on bucket {bucket!r}; check the IAM policy and the bucket policy"
        )
    message = err.response.get("Error", {}).get("Message", "")
    return StorageError(f"cannot {action} {uri}: S3 error {code}: {message}".rstrip(": "))


@contextlib.contextmanager
def _s3_errors(uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except Exception as err:  # only boto errors are translated; anything else propagates
        translated = _translate(err, uri, action)
        if translated is None:
            raise
        raise translated from err


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
    """A readable binary stream. S3 objects stream (nothing is downloaded up front) and a
    connection that breaks mid-object is reopened at the same offset."""
    if is_s3(uri):
        return io.BufferedReader(_S3Stream(uri), buffer_size=STREAM_BUFFER)
    with _local_errors(uri, "read"):
        return open(uri, "rb")


class _S3Stream(io.RawIOBase):
    """GetObject body that resumes with a Range request (pinned to the same ETag) on a broken read."""

    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.pos = 0
        self.etag: str | None = None
        self.body = self._open()

    def _open(self):
        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            kwargs.update(Range=f"bytes={self.pos}-", IfMatch=self.etag)
        with _s3_errors(self.uri, "read"):
            response = _client().get_object(**kwargs)
        self.etag = response.get("ETag", self.etag)
        return response["Body"]

    def readable(self) -> bool:
        return True

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(8 * 1024 * 1024):  # the default would read 8 KiB at a time
            chunks.append(chunk)
        return b"".join(chunks)

    def readinto(self, buffer) -> int:
        from http.client import HTTPException

        from botocore import exceptions as bx
        from urllib3 import exceptions as ux

        for attempt in range(STREAM_REOPEN_ATTEMPTS + 1):
            try:
                data = self.body.read(len(buffer))
                break
            except (bx.BotoCoreError, ux.HTTPError, HTTPException, OSError) as err:
                if attempt == STREAM_REOPEN_ATTEMPTS:
                    raise StorageError(f"reading {self.uri} kept failing at byte {self.pos}: {err}") from err
                time.sleep(min(10.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0))
                self.body = self._open()
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
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
        with _s3_errors(uri, "download"):
            _client().download_file(bucket, key, str(local_path), Config=config)
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
        with _s3_errors(uri, "write"):
            _client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    with _local_errors(uri, "write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def upload_file(local_path: str | Path, uri: str) -> None:
    """Copy a local file to uri; large files go to S3 as a parallel multipart upload."""
    if is_s3(uri):
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3(uri)
        config = TransferConfig(
            multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=MULTIPART_CONCURRENCY,
        )
        with _s3_errors(uri, "upload to"):
            _client().upload_file(str(local_path), bucket, key, Config=config)
        return
    path = Path(uri)
    with _local_errors(uri, "write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Listing and deleting.


def exists(uri: str) -> bool:
    """True for an existing file/object or a non-empty directory/prefix."""
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    client = _client()
    with _s3_errors(uri, "check"):
        if key and not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as err:
                if _error_code(err) not in ("404", "NoSuchKey", "NotFound"):
                    raise
        prefix = key.rstrip("/") + "/" if key else ""
        response = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return response.get("KeyCount", 0) > 0


def list_dir(uri: str) -> list[str]:
    """Names of the direct children of a directory/prefix (files and sub-directories), sorted."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        names = set()
        with _s3_errors(uri, "list"):
            for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                names.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
                names.update(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(names)
    path = Path(uri)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def list_files(uri: str) -> list[FileInfo]:
    """Every file below a directory/prefix, recursively, sorted by relative path.

    One paginated listing on S3 (1,000 keys per request), not one request per folder.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        found = []
        with _s3_errors(uri, "list"):
            for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found += [
                    FileInfo(o["Key"][len(prefix):], int(o["Size"]))
                    for o in page.get("Contents", []) if not o["Key"].endswith("/")
                ]
        return sorted(found, key=lambda f: f.path)
    root = Path(uri)
    if not root.is_dir():
        return []
    with _local_errors(uri, "list"):
        found = [
            FileInfo(p.relative_to(root).as_posix(), p.stat().st_size)
            for p in root.rglob("*") if p.is_file()
        ]
    return sorted(found, key=lambda f: f.path)


def delete_tree(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = _client()
        prefix = key.rstrip("/") + "/"
        with _s3_errors(uri, "delete"):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objs:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": objs})
        return
    shutil.rmtree(uri, ignore_errors=True)
