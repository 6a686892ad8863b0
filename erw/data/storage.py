"""One small interface over local paths and s3://bucket/prefix URIs.

Minimal first version: the data-plane work hardens it (retries, multipart, clear errors)
without changing these signatures.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from erw.errors import ErwError


class StorageError(ErwError):
    """A storage operation failed; the message says what and how to fix it."""


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


def _client():
    import boto3

    return boto3.client("s3")


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def open_read(uri: str) -> BinaryIO:
    if is_s3(uri):
        return io.BytesIO(read_bytes(uri))
    return open(uri, "rb")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; local writes go through a temporary name and a rename."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def upload_file(local_path: str | Path, uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _client().upload_file(str(local_path), bucket, key)
        return
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(uri).with_name(f".{Path(uri).name}.tmp-{os.getpid()}")
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, uri)


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        resp = _client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        return any(o["Key"] == key or o["Key"].startswith(key.rstrip("/") + "/") for o in resp.get("Contents", []))
    return Path(uri).exists()


def list_dir(uri: str) -> list[str]:
    """Names of the direct children of a directory/prefix (files and sub-directories), sorted."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        names = set()
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
            names.update(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(names)
    path = Path(uri)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def delete_tree(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = _client()
        prefix = key.rstrip("/") + "/"
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                client.delete_objects(Bucket=bucket, Delete={"Objects": objs})
        return
    shutil.rmtree(uri, ignore_errors=True)
