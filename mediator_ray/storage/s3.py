"""S3 backend over boto3: ranged GETs, paginated listing, multipart PUTs, clear errors.

Settings come from the standard AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, …)
unless :class:`StorageOptions` names them explicitly. botocore retries throttling and 5xx
answers with backoff; this module adds retries for a body stream that breaks mid-read, which
botocore does not cover.
"""

from __future__ import annotations

import functools
import io
import os
import random
import time
from typing import Any

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from mediator_ray.errors import ObjectNotFoundError, StorageError
from mediator_ray.storage.base import IOStats, ObjectStore, StorageOptions

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AccessDenied",
    "403",
}
_STREAM_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.ReadTimeoutError,
)


#: Environment variables boto3 reads; part of the client cache key so a change takes effect.
_ENVIRONMENT = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
)


@functools.lru_cache(maxsize=32)
def _shared_client(options: StorageOptions, environment: tuple) -> Any:
    """One boto3 client per (options, AWS environment) per process.

    Building a session parses botocore's service JSON (~0.1 s); clients are thread-safe, so
    every store with the same settings shares one, with a pool sized for their concurrency.
    """
    session = boto3.session.Session(
        aws_access_key_id=options.access_key_id,
        aws_secret_access_key=options.secret_access_key,
        aws_session_token=options.session_token,
        region_name=options.region,
    )
    config = Config(
        retries={"max_attempts": options.max_attempts, "mode": "standard"},
        max_pool_connections=max(10, options.concurrency + 4),
        connect_timeout=10,
        read_timeout=60,
    )
    return session.client("s3", endpoint_url=options.endpoint_url, config=config)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket")
    return bucket, prefix.strip("/")


class S3Store(ObjectStore):
    """Objects below ``s3://bucket/prefix``. The boto3 client is built lazily per process."""

    def __init__(
        self, uri: str, options: StorageOptions | None = None, stats: IOStats | None = None
    ):
        super().__init__(uri, options, stats)
        self.bucket, self.prefix = split_s3_uri(self.uri)
        self._client: Any = None

    # ---- client and error translation -------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            environment = tuple((name, os.environ.get(name)) for name in _ENVIRONMENT)
            self._client = _shared_client(self.options, environment)
        return self._client

    def _full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def _translate(self, error: Exception, key: str, action: str) -> StorageError:
        where = self.url(key)
        if isinstance(error, botocore.exceptions.NoCredentialsError):
            return StorageError(
                f"{action} {where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or pass them in the storage options"
            )
        if isinstance(error, botocore.exceptions.EndpointConnectionError):
            return StorageError(f"{action} {where}: cannot reach the S3 endpoint ({error})")
        if isinstance(error, botocore.exceptions.ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return StorageError(f"{action} {where}: bucket {self.bucket!r} does not exist")
            if code in _NOT_FOUND_CODES:
                if not self._bucket_exists():
                    return StorageError(f"{action} {where}: bucket {self.bucket!r} does not exist")
                return ObjectNotFoundError(f"{where}: no such object")
            if code in _CREDENTIAL_CODES:
                return StorageError(
                    f"{action} {where}: S3 refused the credentials ({code}); check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
                )
            return StorageError(f"{action} {where}: S3 error {code}: {error}")
        return StorageError(f"{action} {where}: {error}")

    def _bucket_exists(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError:
            return False
        return True

    # ---- primitives --------------------------------------------------------------------------
    def size(self, key: str) -> int:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._full_key(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._translate(e, key, "size of") from e
        return int(head["ContentLength"])

    def _get_into(self, key: str, start: int, out: memoryview) -> int:
        """Ranged GET streamed straight into ``out`` (no intermediate bytes object)."""
        end = start + len(out)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=self._full_key(key), Range=f"bytes={start}-{end - 1}"
                )
                body, done = response["Body"], 0
                while done < len(out):
                    n = body.readinto(out[done:])
                    if not n:
                        break
                    done += n
                return done
            except _STREAM_ERRORS as e:
                if attempt >= self.options.max_attempts:
                    raise self._translate(e, key, "read") from e
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                if _error_code(e) == "InvalidRange":
                    return 0  # read past the end: the caller reports the short read
                raise self._translate(e, key, "read") from e

    def list(self, prefix: str = "") -> list[str]:
        full = self._full_key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    k = item["Key"]
                    # S3 prefixes are strings ("a/b" matches "a/bc"); keep folder semantics.
                    if prefix and not (k == full or k.startswith(full.rstrip("/") + "/")):
                        continue
                    keys.append(k[strip:])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._translate(e, prefix, "list") from e
        return sorted(keys)

    def _put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        full = self._full_key(key)
        try:
            if len(data) < self.options.multipart_threshold:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))
            else:
                transfer = TransferConfig(
                    multipart_threshold=self.options.multipart_threshold,
                    multipart_chunksize=max(self.options.part_size, 8 * 1024 * 1024),
                    max_concurrency=self.options.concurrency,
                    use_threads=True,
                )
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, full, Config=transfer)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._translate(e, key, "write") from e
        except boto3.exceptions.S3UploadFailedError as e:
            raise StorageError(f"write {self.url(key)}: {e}") from e

    def tag(self, key: str) -> str | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._full_key(key))
        except botocore.exceptions.ClientError as e:
            if _error_code(e) in _NOT_FOUND_CODES:
                return None
            raise self._translate(e, key, "tag of") from e
        return str(head["ETag"])

    def _put_if(self, key: str, data: bytes, expected_tag: str | None) -> bool:
        condition = {"IfNoneMatch": "*"} if expected_tag is None else {"IfMatch": expected_tag}
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._full_key(key), Body=data, **condition
            )
        except botocore.exceptions.ClientError as e:
            if _error_code(e) in {"PreconditionFailed", "412", "ConditionalRequestConflict"}:
                return False
            if _error_code(e) in {"NoSuchKey", "404"} and expected_tag is not None:
                return False  # replaced object vanished meanwhile: the condition failed
            raise self._translate(e, key, "conditional write") from e
        return True

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._full_key(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._translate(e, key, "delete") from e

    def child(self, prefix: str) -> S3Store:
        sub = prefix.strip("/")
        return S3Store(f"{self.uri}/{sub}" if sub else self.uri, self.options, self.stats)

    def download_to_file(self, key: str, path: str) -> None:
        """boto3's own ``download_file``: the reference our reader is benchmarked against."""
        self.client.download_file(self.bucket, self._full_key(key), path)


def _error_code(error: Exception) -> str:
    if isinstance(error, botocore.exceptions.ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""
