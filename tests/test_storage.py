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
        ("a.json", 2),
        ("a/x.bin", 5),
        ("a/y.bin", 8),
        ("b.json", 2),
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


def test_writes_reads_and_listings_ride_out_5xx_slowdown_and_resets(s3_bucket, s3_proxy):
    uri = f"{s3_bucket}/blips/x.bin"
    data = os.urandom(50_000)
    s3_proxy.fail(3, status=503, code="SlowDown")
    s3_proxy.fail(2, status=500, code="InternalError")
    s3_proxy.reset(3)
    storage.write_bytes(uri, data)
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == data
    assert [f.path for f in storage.list_files(f"{s3_bucket}/blips")] == ["x.bin"]
    storage.delete_tree(f"{s3_bucket}/blips")
    assert s3_proxy.injected == {"fail": 5, "reset": 3}


def test_an_outage_within_the_budget_is_ridden_out(s3_bucket, s3_proxy, monkeypatch):
    monkeypatch.setenv("ERW_S3_RETRY_SECONDS", "60")
    s3_proxy.outage(3)  # every request refused for 3 s: an endpoint restart
    storage.write_bytes(f"{s3_bucket}/during-outage.bin", b"kept")
    assert s3_proxy.injected["outage"] >= 1
    assert storage.read_bytes(f"{s3_bucket}/during-outage.bin") == b"kept"


def test_an_outage_past_the_budget_fails_with_one_line(s3_bucket, s3_proxy, monkeypatch):
    storage.write_bytes(f"{s3_bucket}/x.bin", b"x")
    monkeypatch.setenv("ERW_S3_RETRY_SECONDS", "1")
    s3_proxy.outage(600)
    with pytest.raises(storage.StorageError) as caught:
        storage.read_bytes(f"{s3_bucket}/x.bin")
    message = str(caught.value)
    assert "\n" not in message and "cannot read s3://" in message
    assert "retried for" in message and "ERW_S3_RETRY_SECONDS=1" in message
    assert s3_proxy.injected["outage"] >= 2  # it did retry


def test_a_broken_read_reopens_at_the_same_offset(s3_bucket, s3_proxy):
    data = os.urandom(3 * storage.STREAM_BUFFER + 123)
    uri = f"{s3_bucket}/stream.bin"
    storage.write_bytes(uri, data)
    s3_proxy.cut(1, after=2 * storage.STREAM_BUFFER + 10)  # the connection dies inside the third read
    with storage.open_read(uri) as stream:
        assert isinstance(stream, io.BufferedReader)
        chunks = [stream.read(1000)]  # only a buffer's worth has been fetched
        while chunk := stream.read(storage.STREAM_BUFFER):
            chunks.append(chunk)
    assert b"".join(chunks) == data
    gets = [r for m, _, r in s3_proxy.log if m == "GET"]
    assert gets == [None, f"bytes={2 * storage.STREAM_BUFFER + 10}-"]  # from the first byte not received


def test_a_stalled_read_is_reopened_after_the_stall_timeout(s3_bucket, s3_proxy, monkeypatch):
    monkeypatch.setenv("ERW_S3_STALL_SECONDS", "3")  # default 10 s; botocore's own would be 60 s
    data = os.urandom(2 * storage.STREAM_BUFFER + 5)
    uri = f"{s3_bucket}/stalled.bin"
    storage.write_bytes(uri, data)
    s3_proxy.stall(1, after=storage.STREAM_BUFFER + 7)  # headers and a bit, then silence
    assert storage.read_bytes(uri) == data
    gets = [r for m, _, r in s3_proxy.log if m == "GET"]
    assert gets[0] is None and gets[-1] == f"bytes={storage.STREAM_BUFFER}-"  # reopened where it stalled


def test_a_multipart_upload_rides_out_failed_parts(s3_bucket, s3_proxy, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    (tmp_path / "big").write_bytes(data)
    s3_proxy.fail(2, status=503, code="SlowDown", method="PUT")
    s3_proxy.reset(1, method="PUT")
    storage.upload_file(tmp_path / "big", f"{s3_bucket}/big.tar")
    assert storage.read_bytes(f"{s3_bucket}/big.tar") == data


def test_a_failed_multipart_upload_is_aborted(s3_bucket, s3_proxy, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    monkeypatch.setenv("ERW_S3_RETRY_SECONDS", "1")
    (tmp_path / "big").write_bytes(os.urandom(11 * 1024 * 1024))
    s3_proxy.fail(10_000, status=500, code="InternalError", method="PUT")  # every part fails
    with pytest.raises(storage.StorageError, match="cannot upload to .*InternalError.*retried for"):
        storage.upload_file(tmp_path / "big", f"{s3_bucket}/big.tar")
    s3_proxy.clear()
    bucket = s3_bucket[len("s3://") :]
    assert boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert not storage.exists(f"{s3_bucket}/big.tar")


@pytest.mark.parametrize(
    "uri, message",
    [
        ("s3:/my-bucket/run1", "is not an S3 URI \\(write it 's3://my-bucket/run1'\\)"),
        ("S3://my-bucket/run1", "is not an S3 URI"),
        ("s3://", "names no bucket"),
        ("s3:///latents", "names no bucket|no valid bucket name"),
        ("s3://ab/x", "no valid bucket name"),
        ("gs://bucket/x", "scheme 'gs' is not supported"),
        ("", "is empty"),
    ],
)
def test_malformed_locations_are_refused(uri, message):
    with pytest.raises(storage.StorageError, match=message):
        storage.check_uri(uri, "train.out")


def test_well_formed_locations_pass(tmp_path):
    for uri in ("s3://my-bucket", "s3://my-bucket/a/b", str(tmp_path), "runs/demo/train", "./x:y"):
        storage.check_uri(uri, "train.out")


def test_check_writable(s3_bucket, tmp_path, monkeypatch):
    storage.check_writable(str(tmp_path / "new" / "dir"), "train.out")
    assert not (tmp_path / "new").exists()  # neither the probe nor the folders made for it are left
    (tmp_path / "used").mkdir()
    storage.check_writable(str(tmp_path / "used"), "train.out")
    assert list((tmp_path / "used").iterdir()) == []
    storage.check_writable(f"{s3_bucket}/runs/x", "train.out")
    assert storage.list_files(s3_bucket) == []
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(storage.StorageError, match="train.out=.*file cannot be written"):
        storage.check_writable(str(tmp_path / "file"), "train.out")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.check_writable("s3://no-such-bucket-x/runs", "train.out")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(storage.StorageError, match="train.out=s3://.* cannot be written: .*no S3 credentials"):
        storage.check_writable(f"{s3_bucket}/runs/x", "train.out")


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
    code = cli.main(
        [
            "precompute",
            "--no-progress",
            "data.source=s3://no-such-bucket/images",
            f"data.shards={tmp_path / 'out'}",
            "data.codec=identity",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("erw precompute: error: cannot list s3://no-such-bucket/images: bucket")


def test_conditional_write_is_a_compare_and_swap(root):
    uri = storage.join(root, "claim.json")
    assert storage.write_if(uri, b"first", None)
    assert not storage.write_if(uri, b"second", None), "create-only must refuse an existing file"
    data, version = storage.read_versioned(uri)
    assert data == b"first"
    assert storage.write_if(uri, b"third", version)
    assert not storage.write_if(uri, b"stale", version), "a replaced version must be refused"
    assert storage.read_versioned(uri)[0] == b"third"


DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--config", DEMO, "train.out=s3:/my-bucket/run1/train"],
            "erw train: error: train.out='s3:/my-bucket/run1/train' is not an S3 URI (write it 's3://my-bucket/run1/train')",
        ),
        (["warmup", "--config", DEMO, "warmup.out=s3://"], "erw warmup: error: warmup.out='s3://' names no bucket"),
        (
            ["train", "--config", DEMO, "train.out=s3://no-such-bucket-x/run"],
            "erw train: error: train.out=s3://no-such-bucket-x/run cannot be written: cannot write",
        ),
        (
            ["precompute", "data.source=x", "data.shards=s3:/b-x/y", "data.codec=identity"],
            "erw precompute: error: data.shards='s3:/b-x/y' is not an S3 URI",
        ),
        (["sample", "--ckpt", "x", "--out", "S3://b-x/y"], "erw sample: error: --out='S3://b-x/y' is not an S3 URI"),
    ],
)
def test_outputs_are_checked_before_any_compute(argv, message, s3_endpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1
    assert captured.out == ""  # nothing started: no model built, no data read
    assert list(tmp_path.iterdir()) == []  # and no local folder named "s3:"
