"""ObjectStore: the same behaviour from a local folder and from a real S3 server (moto)."""

from __future__ import annotations

import os
import pickle

import boto3
import pytest

from mediator_ray.errors import ObjectNotFoundError, StorageError
from mediator_ray.storage import (
    ByteRange,
    LocalStore,
    ObjectStore,
    S3Store,
    StorageOptions,
    open_store,
    plan_fetches,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path) -> ObjectStore:
    options = StorageOptions(part_size=64 * 1024, multipart_threshold=5 * 1024 * 1024)
    if request.param == "local":
        return open_store(str(tmp_path / "root"), options)
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"{bucket}/some/prefix", options)


def test_plan_fetches_coalesces_adjacent_and_splits_large() -> None:
    ranges = [
        ByteRange("a", 10, 20),
        ByteRange("a", 0, 10),  # touches the next: merged
        ByteRange("a", 30, 40),  # gap of 10: merged only with coalesce_gap >= 10
        ByteRange("b", 0, 25),
        ByteRange("a", 5, 5),  # empty: ignored
    ]
    assert plan_fetches(ranges, coalesce_gap=0, part_size=100) == [
        ByteRange("a", 0, 20),
        ByteRange("a", 30, 40),
        ByteRange("b", 0, 25),
    ]
    assert plan_fetches(ranges, coalesce_gap=10, part_size=100)[0] == ByteRange("a", 0, 40)
    assert plan_fetches([ByteRange("b", 0, 25)], coalesce_gap=0, part_size=10) == [
        ByteRange("b", 0, 10),
        ByteRange("b", 10, 20),
        ByteRange("b", 20, 25),
    ]


def test_write_read_list_delete(store: ObjectStore) -> None:
    payload = os.urandom(300_000)
    store.write("dir/blob.bin", payload)
    store.write_text("dir/sub/note.txt", "hello")
    store.write_text("dirx/other.txt", "not under dir/")

    assert store.size("dir/blob.bin") == len(payload)
    assert store.read("dir/blob.bin") == payload
    assert store.read_text("dir/sub/note.txt") == "hello"
    assert store.list("dir") == ["dir/blob.bin", "dir/sub/note.txt"]
    assert store.list() == ["dir/blob.bin", "dir/sub/note.txt", "dirx/other.txt"]
    assert store.exists("dir/blob.bin") and not store.exists("dir/nope")

    store.delete("dir/blob.bin")
    store.delete("dir/blob.bin")  # absent: no error
    assert not store.exists("dir/blob.bin")
    with pytest.raises(ObjectNotFoundError, match=r"blob\.bin"):
        store.size("dir/blob.bin")


def test_read_many_returns_exact_bytes_and_counts_only_requested(store: ObjectStore) -> None:
    payload = os.urandom(1_000_000)
    store.write("data.bin", payload)
    store.write("other.bin", payload[::-1])
    store.stats.reset()

    ranges = [
        ByteRange("data.bin", 100, 200_100),  # 200 kB: split into 64 kB parts
        ByteRange("data.bin", 200_100, 200_200),  # adjacent: coalesced with the previous
        ByteRange("other.bin", 0, 10),
        ByteRange("data.bin", 999_990, 1_000_000),
        ByteRange("data.bin", 500, 600),  # inside an earlier range: served from it
    ]
    views = store.read_many(ranges)

    assert [bytes(v) for v in views] == [
        payload[100:200_100],
        payload[200_100:200_200],
        payload[::-1][0:10],
        payload[999_990:],
        payload[500:600],
    ]
    requested = 200_000 + 100 + 10 + 10  # the contained range costs nothing more
    assert store.stats.bytes_read == requested
    # 200_100 bytes in 64 KiB parts = 4 GETs, plus one each for the two small ranges.
    assert store.stats.read_requests == 6


def test_read_past_end_is_a_clear_error(store: ObjectStore) -> None:
    store.write("short.bin", b"0123456789")
    with pytest.raises(ObjectNotFoundError, match=r"short\.bin.*shorter"):
        store.read_many([ByteRange("short.bin", 5, 50)])


def test_large_write_goes_multipart_and_reads_back(store: ObjectStore) -> None:
    payload = os.urandom(6 * 1024 * 1024)  # above the 5 MiB threshold set by the fixture
    store.write("big.bin", payload)
    assert store.read("big.bin") == payload


def test_child_store_and_pickling_keep_root_and_options(store: ObjectStore) -> None:
    child = store.child("nested/deeper")
    child.write_text("x.txt", "1")
    assert store.read_text("nested/deeper/x.txt") == "1"
    assert child.stats is store.stats
    clone = pickle.loads(pickle.dumps(child))
    assert type(clone) is type(child) and clone.uri == child.uri
    assert clone.options == child.options and clone.read_text("x.txt") == "1"


def test_uri_handling(tmp_path) -> None:
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert open_store(f"file://{tmp_path}").root == tmp_path
    assert isinstance(open_store("s3://bucket/prefix"), S3Store)
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(StorageError, match="names no bucket"):
        open_store("s3:///x")
    with pytest.raises(StorageError, match="escapes the store root"):
        open_store(str(tmp_path)).read("../etc/passwd")


def test_missing_bucket_is_named(s3_server: str) -> None:
    store = open_store("s3://no-such-bucket-here/models/base")
    for action in (
        lambda: store.size("config.json"),
        lambda: store.read_range("config.json", 0, 8),
        lambda: store.list(),
    ):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
            action()


def test_wrong_credentials_are_refused_clearly(s3_bucket: str) -> None:
    from moto.core.authorization import enable_iam_authentication

    # A real IAM user with full S3 access: its key works, the same key with a wrong secret
    # or an unknown key does not. moto checks signatures only while authentication is on.
    iam = boto3.client("iam")
    iam.create_user(UserName="merger")
    iam.put_user_policy(
        UserName="merger",
        PolicyName="s3",
        PolicyDocument='{"Version":"2012-10-17","Statement":'
        '[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}',
    )
    key = iam.create_access_key(UserName="merger")["AccessKey"]
    open_store(s3_bucket).write_text("config.json", "{}")

    def store_with(secret: str, key_id: str = key["AccessKeyId"]) -> ObjectStore:
        return open_store(
            s3_bucket,
            StorageOptions(access_key_id=key_id, secret_access_key=secret, max_attempts=1),
        )

    with enable_iam_authentication():
        assert store_with(key["SecretAccessKey"]).read_text("config.json") == "{}"
        with pytest.raises(StorageError, match=r"refused the credentials.*SignatureDoesNotMatch"):
            store_with("wrong-secret").read_range("config.json", 0, 2)
        with pytest.raises(StorageError, match=r"refused the credentials.*InvalidAccessKeyId"):
            store_with("whatever", key_id="AKIANOSUCHKEY0000000").list()
        # HEAD answers carry no error body: the status alone must still read clearly.
        with pytest.raises(StorageError, match=r"size of .*config\.json: S3 refused the cred"):
            store_with("wrong-secret").size("config.json")


def test_conditional_writes_create_once_and_compare_and_swap(store: ObjectStore) -> None:
    assert store.tag("pointer.json") is None
    assert store.write_if("pointer.json", b"v1", None)  # create
    assert not store.write_if("pointer.json", b"other", None)  # exists: refused
    tag = store.tag("pointer.json")
    assert tag is not None
    assert store.write_if("pointer.json", b"v2", tag)  # swap from the tag we read
    assert not store.write_if("pointer.json", b"v3", tag)  # stale tag: refused
    assert store.read("pointer.json") == b"v2"
    assert store.list() == ["pointer.json"]  # no lock or temp files visible


def test_only_one_of_many_concurrent_creators_wins(store: ObjectStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda i: store.write_if("lease", f"{i}".encode(), None), range(16)))
    assert sum(wins) == 1
    assert store.read("lease") == str(wins.index(True)).encode()
