"""Storage over local paths and a real S3 endpoint (moto server on 127.0.0.1)."""
from __future__ import annotations

import io
import os
import socket

import boto3
import pytest

from erw import cli
from erw import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/some/prefix"


def test_write_read_list_delete(root):
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_bytes(storage.join(root, "a", "y.bin"), b"12345678")
    storage.write_bytes(storage.join(root, "b.json"), b"{}")
    storage.write_bytes(storage.join(root, "a.json"), b"[]")  # sorts before "a/" on S3

    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"hello"
    assert storage.list_dir(root) == ["a", "a.json", "b.json"]
    assert [(f.path, f.size) for f in storage.list_files(root)] == [
        ("a.json", 2), ("a/x.bin", 5), ("a/y.bin", 8), ("b.json", 2),
    ]
    assert storage.exists(storage.join(root, "a"))  # a directory / prefix
    assert storage.exists(storage.join(root, "a", "x.bin"))
    assert not storage.exists(storage.join(root, "a", "x"))
    assert not storage.exists(storage.join(root, "missing"))

    storage.delete_tree(storage.join(root, "a"))
    assert storage.list_dir(root) == ["a.json", "b.json"]


def test_missing_object_is_not_found(root):
    with pytest.raises(storage.ObjectNotFound, match="does not exist"):
        storage.read_bytes(storage.join(root, "nothing.bin"))
    with pytest.raises(FileNotFoundError):  # the same error, for callers that catch the builtin
        storage.open_read(storage.join(root, "nothing.bin"))


def test_upload_and_download_file(root, tmp_path):
    local = tmp_path / "shard.tar"
    local.write_bytes(os.urandom(100_000))
    storage.upload_file(local, storage.join(root, "shard.tar"))
    storage.download_file(storage.join(root, "shard.tar"), tmp_path / "back.tar")
    assert (tmp_path / "back.tar").read_bytes() == local.read_bytes()
    storage.download_tree(root, tmp_path / "tree")
    assert (tmp_path / "tree" / "shard.tar").read_bytes() == local.read_bytes()


def test_large_upload_goes_multipart(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 * 1024 * 1024)  # the S3 minimum part size
    data = os.urandom(11 * 1024 * 1024)
    (tmp_path / "big").write_bytes(data)
    uri = f"{s3_bucket}/big.tar"
    storage.upload_file(tmp_path / "big", uri)
    etag = boto3.client("s3").head_object(Bucket=uri[5:].split("/")[0], Key="big.tar")["ETag"]
    assert etag.strip('"').endswith("-3")  # S3 marks multipart objects with "-<parts>"
    assert storage.read_bytes(uri) == data


def test_open_read_streams_and_resumes_a_broken_connection(s3_bucket, monkeypatch):
    data = os.urandom(3 * storage.STREAM_BUFFER + 123)
    uri = f"{s3_bucket}/stream.bin"
    storage.write_bytes(uri, data)
    opened = []
    real_open = storage._S3Stream._open

    def flaky_open(self):
        body = real_open(self)
        opened.append(self.pos)
        if len(opened) == 1:  # the first connection dies after one read
            from urllib3.exceptions import ProtocolError

            real_read = body.read
            calls = iter(range(100))

            def read(amount=None):
                if next(calls) == 1:
                    raise ProtocolError("connection reset by peer")
                return real_read(amount)

            body.read = read
        return body

    monkeypatch.setattr(storage._S3Stream, "_open", flaky_open)
    monkeypatch.setattr(storage.time, "sleep", lambda _s: None)
    with storage.open_read(uri) as stream:
        assert isinstance(stream, io.BufferedReader)
        first = stream.read(1000)  # only a buffer's worth has been fetched
        rest = stream.read()
    assert first + rest == data
    assert opened == [0, storage.STREAM_BUFFER]  # reopened at the broken offset


def test_missing_bucket_message(s3_endpoint):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        storage.read_bytes("s3://no-such-bucket/x.json")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.list_files("s3://no-such-bucket/images")


def test_missing_credentials_message(s3_bucket, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(storage.StorageError, match="no S3 credentials found. Set AWS_ACCESS_KEY_ID"):
        storage.list_dir(s3_bucket)


def test_rejected_credentials_message(s3_bucket, s3_auth_enforced, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    with s3_auth_enforced():
        with pytest.raises(storage.StorageError, match=r"rejected the credentials \(InvalidAccessKeyId\)"):
            storage.read_bytes(f"{s3_bucket}/x.json")


def test_unreachable_endpoint_message(s3_endpoint, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(storage.StorageError, match="cannot be reached.*Check AWS_ENDPOINT_URL"):
        storage.list_dir("s3://some-bucket/x")


def test_cli_prints_one_line_for_an_unreadable_source(s3_endpoint, tmp_path, capsys):
    code = cli.main(["precompute", "--source", "s3://no-such-bucket/images", "--out", str(tmp_path / "out"),
                     "--codec", "identity", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("erw precompute: error: cannot list s3://no-such-bucket/images: bucket")
