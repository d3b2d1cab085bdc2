"""``s3://bucket/prefix``: chunks as objects in an S3-compatible bucket (AWS S3, MinIO, Ceph, SeaweedFS).

aiobotocore drives the HTTP; it is asyncio-only, so every call goes through
:class:`~lmplug_remote.bridge.AsyncioBridge` (the caller's loop under asyncio, a private loop
thread under trio). Values above ``multipart_threshold`` go up as multipart uploads whose
parts are sent concurrently; S3 makes an object visible only once its PUT or its multipart
completion succeeds, so readers never see half an entry. Reads stream the response body
straight into the caller's buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from lmplug import ConfigError, CorruptChunk, TierUnavailable
from lmplug.tierkit import RemoteConnector
from lmplug_remote.bridge import AsyncioBridge
from lmplug_remote.s3.body import PartsReader, bytes_view, read_into
from lmplug_remote.s3.multipart import MAX_PARTS, run_all, split
from lmplug_remote.s3.options import S3Options

__all__ = ["S3Connector"]

logger = logging.getLogger("lmplug.remote.s3")
T = TypeVar("T")

DELETE_BATCH = 1000
"""DeleteObjects takes at most this many keys."""
_ABORT_WAIT = 5.0
_MISSING_KEY = frozenset({"NoSuchKey", "404", "NotFound"})
_MISSING_BUCKET = frozenset({"NoSuchBucket"})
_TRY_AGAIN = frozenset({"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError"})
_RETRY_PAUSE = 0.05
_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"})


class S3Connector(RemoteConnector):
    """Blobs as objects ``<prefix>/<key>`` in one bucket; see the module docstring."""

    def __init__(self, url: str, options: S3Options) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3" or not parts.netloc:
            raise ConfigError(f"s3 url {url!r}: expected s3://bucket/prefix")
        if parts.query or parts.fragment:
            raise ConfigError(f"s3 url {url!r}: query and fragment are not used; put options under connector:")
        self.url = url
        self.options = options
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint = options.endpoint_url or f"AWS S3 ({options.region})"
        self._bridge = AsyncioBridge("s3")
        self._started = False
        self._client: Any = None
        self._client_context: Any = None
        self._bucket_ready = False
        self._lock: asyncio.Lock | None = None
        self._limit: asyncio.Semaphore | None = None
        self._aborts: set[asyncio.Task[None]] = set()
        self._running: set[asyncio.Task[Any]] = set()
        self._counters = dict.fromkeys(
            (
                "puts",
                "multipart_puts",
                "retries",
                "gets",
                "heads",
                "deleted",
                "aborted_uploads",
                "bytes_sent",
                "bytes_received",
            ),
            0,
        )

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Build the client; no request goes out until the first call (a dead endpoint is not an error here)."""
        if self._started:
            return
        await self._bridge.start()
        self._started = True
        try:
            await self._bridge.run(self._open_client)
        except TierUnavailable:
            raise
        except Exception as exc:
            raise self._unavailable(exc) from exc

    async def _open_client(self) -> None:
        if self._lock is None:
            self._lock, self._limit = asyncio.Lock(), asyncio.Semaphore(self.options.max_concurrency)
        options = self.options
        style = options.addressing_style
        if style == "auto":
            style = "path" if options.endpoint_url else "virtual"
        config = AioConfig(
            s3={"addressing_style": style},
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            # Retries are the connector's own (_send): botocore's rewind a body by seek(), which memoryviews lack.
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=options.max_concurrency + 2,
            # The tier checksums every chunk and verifies what it reads; CRC32s on top of that
            # would only cost time. Validation is off so that memoryviews go out unjoined.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            parameter_validation=False,
        )
        secret = options.secret_access_key
        token = options.session_token
        context = _session().create_client(
            "s3",
            endpoint_url=options.endpoint_url,
            region_name=options.region,
            aws_access_key_id=options.access_key_id,
            aws_secret_access_key=None if secret is None else secret.get_secret_value(),
            aws_session_token=None if token is None else token.get_secret_value(),
            verify=options.verify_tls,
            config=config,
        )
        self._client = await context.__aenter__()
        self._client_context = context
        # botocore asks for "Expect: 100-continue" on every file-like body, so each PUT waits a
        # round trip before its body goes out; and when the server dies between headers and
        # body, aiohttp's 100-continue path leaves a task whose exception nobody retrieves.
        # The tier's bodies are one chunk each: they go out with their headers.
        self._client.meta.events.register_last("before-call.s3", _send_body_at_once)

    async def aclose(self) -> None:
        if not self._started:
            return
        self._started = False
        try:
            await self._bridge.run(self._close_client)
        finally:
            await self._bridge.aclose()

    async def _close_client(self) -> None:
        # Under trio a cancelled call returns before its asyncio side has unwound: let it finish
        # (it may still schedule the abort of an upload) before closing the client under it.
        running = set(self._running) if self._bridge.threaded else set()
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=_ABORT_WAIT)
        aborts = set(self._aborts)
        if aborts:  # let pending aborts of failed uploads finish, but not for long
            _done, late = await asyncio.wait(aborts, timeout=_ABORT_WAIT)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        context, self._client_context, self._client = self._client_context, None, None
        if context is not None:
            await context.__aexit__(None, None, None)

    # ------------------------------------------------------------------ calls

    async def _call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``function`` on the library's loop, its errors translated into TierUnavailable."""
        if not self._started:
            raise TierUnavailable(f"s3 {self.endpoint}: connector used before connect() or after aclose()")
        return await self._bridge.run(self._translated, function, *args)

    async def _translated(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            await self._ready()
            return await function(*args)
        except (TierUnavailable, CorruptChunk):
            raise
        except Exception as exc:
            raise self._unavailable(exc) from exc
        finally:
            self._running.discard(task)

    async def _ready(self) -> None:
        """Check (or create) the bucket once, on first use: a HEAD of a key in a missing bucket is just a 404."""
        if self._bucket_ready:
            return
        assert self._lock is not None
        async with self._lock:
            if self._bucket_ready:
                return
            if self._client is None:  # building it failed in connect(): try again
                await self._open_client()
            try:
                await self._send(self._client.head_bucket, Bucket=self.bucket)
            except ClientError as exc:
                if _code(exc) not in _MISSING_KEY | _MISSING_BUCKET:
                    raise
                if not self.options.create_bucket:
                    raise TierUnavailable(
                        f"s3 {self.endpoint}: bucket {self.bucket!r} does not exist "
                        "(create it, or set the connector's create_bucket: true)"
                    ) from None
                await self._create_bucket()
            self._bucket_ready = True

    async def _create_bucket(self) -> None:
        arguments: dict[str, Any] = {"Bucket": self.bucket}
        if self.options.region != "us-east-1":
            arguments["CreateBucketConfiguration"] = {"LocationConstraint": self.options.region}
        try:
            await self._client.create_bucket(**arguments)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        logger.info("s3 %s: created bucket %r", self.endpoint, self.bucket)

    async def _send(self, request: Callable[..., Awaitable[dict[str, Any]]], **arguments: Any) -> dict[str, Any]:
        """One S3 request, tried up to ``max_attempts`` times while it fails for a passing reason."""
        attempt = 1
        while True:
            try:
                return await request(**arguments)
            except Exception as exc:
                if attempt >= self.options.max_attempts or not _retryable(exc):
                    raise
                self._counters["retries"] += 1
            await asyncio.sleep(_RETRY_PAUSE * 2 ** (attempt - 1))
            attempt += 1

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _unavailable(self, exc: BaseException) -> TierUnavailable:
        """The library's error as TierUnavailable naming the endpoint, the bucket and the cause."""
        where = f"s3 {self.endpoint} bucket {self.bucket!r}"
        if isinstance(exc, ClientError):
            code = _code(exc)
            message = exc.response.get("Error", {}).get("Message", "") or str(exc)
            if code in _MISSING_BUCKET:
                cause = f"bucket {self.bucket!r} does not exist"
            elif code in _DENIED:
                cause = f"access denied ({code}: {message})"
            else:
                cause = f"{code}: {message}"
        elif isinstance(exc, EndpointConnectionError):
            cause = f"cannot connect (connection refused or unreachable): {exc}"
        elif isinstance(exc, ConnectTimeoutError):
            cause = f"connect timed out: {exc}"
        elif isinstance(exc, ReadTimeoutError | asyncio.TimeoutError):
            cause = f"read timed out: {exc}"
        elif isinstance(exc, NoCredentialsError):
            cause = "no credentials: set access_key_id/secret_access_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        elif isinstance(exc, BotoCoreError | aiohttp.ClientError | OSError):
            cause = f"{type(exc).__name__}: {exc}"
        else:
            cause = f"unexpected {type(exc).__name__}: {exc}"
        return TierUnavailable(f"{where}: {cause}")

    # ------------------------------------------------------------------ put

    async def put_many(self, entries: Sequence[tuple[str, Sequence[memoryview]]], ttl: float | None) -> None:
        """One object per value, one after another, in one hop to the library's loop."""
        # S3 has no per-object expiry: `ttl` is left to the bucket's lifecycle rules (see the README).
        if entries:
            await self._call(
                self._put_all, [(self._key(key), [bytes_view(part) for part in parts]) for key, parts in entries]
            )

    async def _put_all(self, values: list[tuple[str, list[memoryview]]]) -> None:
        for name, parts in values:
            await self._put(name, parts)

    async def _put(self, name: str, parts: list[memoryview]) -> None:
        total = sum(len(part) for part in parts)
        if total >= self.options.multipart_threshold:
            await self._put_multipart(name, parts, total)
            return
        async with self._limited():
            await self._send(self._client.put_object, Bucket=self.bucket, Key=name, Body=PartsReader(parts))
        self._counters["puts"] += 1
        self._counters["bytes_sent"] += total

    async def _put_multipart(self, name: str, parts: list[memoryview], total: int) -> None:
        # The part size grows past `part_size` only if S3's 10,000-part limit demands it.
        size = max(self.options.part_size, -(-total // MAX_PARTS))
        pieces = split(parts, size)
        async with self._limited():
            # Shielded: cancelled while the server creates the upload, we still learn its id to abort it.
            creating = asyncio.ensure_future(
                self._send(self._client.create_multipart_upload, Bucket=self.bucket, Key=name)
            )
            try:
                created = await asyncio.shield(creating)
            except asyncio.CancelledError:
                self._abort_soon(name, creating)
                raise
        upload_id: str = created["UploadId"]
        etags: list[str] = [""] * len(pieces)

        async def upload(index: int) -> None:
            async with self._limited():
                answer = await self._send(
                    self._client.upload_part,
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    PartNumber=index + 1,
                    Body=PartsReader(pieces[index]),
                )
            etags[index] = answer["ETag"]

        try:
            await run_all(upload(index) for index in range(len(pieces)))
            async with self._limited():
                await self._send(
                    self._client.complete_multipart_upload,
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": [{"ETag": tag, "PartNumber": i + 1} for i, tag in enumerate(etags)]},
                )
        except BaseException:
            self._abort_soon(name, upload_id)
            raise
        self._counters["multipart_puts"] += 1
        self._counters["bytes_sent"] += total

    def _abort_soon(self, name: str, upload: str | asyncio.Future[dict[str, Any]]) -> None:
        """Abort a failed or cancelled upload (its id, or the creation still under way) in a task of its own."""

        async def abort() -> None:
            try:
                upload_id = upload if isinstance(upload, str) else (await upload)["UploadId"]
                await asyncio.wait_for(
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id), _ABORT_WAIT
                )
                self._counters["aborted_uploads"] += 1
            except Exception as exc:  # the server may be gone; its own clean-up of stale uploads takes over
                logger.debug("s3 %s: aborting upload of %s failed: %s", self.endpoint, name, exc)

        task = asyncio.get_running_loop().create_task(abort())
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    @contextlib.asynccontextmanager
    async def _limited(self) -> Any:
        assert self._limit is not None
        async with self._limit:
            yield

    # ------------------------------------------------------------------ get

    async def get_into(self, key: str, parts: Sequence[memoryview]) -> int | None:
        return await self._call(self._get_into, self._key(key), [bytes_view(part) for part in parts])

    async def _get_into(self, name: str, parts: list[memoryview]) -> int | None:
        capacity = sum(len(part) for part in parts)
        async with self._limited():
            try:
                response = await self._send(self._client.get_object, Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _code(exc) in _MISSING_KEY:
                    return None
                raise
            body = response["Body"]
            try:
                length = int(response["ContentLength"])
                if length > capacity:
                    raise CorruptChunk(f"s3 object {name}: {length} bytes, at most {capacity} expected")
                got = await read_into(body.raw_stream.content, parts, length)
            finally:
                body.close()  # a no-op once the body was read to its end; drops a half-read connection
        if got != length:
            raise TierUnavailable(f"s3 {self.endpoint}: object {name} ended after {got} of {length} bytes")
        self._counters["gets"] += 1
        self._counters["bytes_received"] += length
        return length

    # ------------------------------------------------------------------ exists / delete

    async def exists(self, keys: Sequence[str]) -> list[bool]:
        return await self._call(self._exists, [self._key(key) for key in keys])

    async def _exists(self, names: list[str]) -> list[bool]:
        found = [False] * len(names)

        async def head(index: int) -> None:
            async with self._limited():
                try:
                    await self._send(self._client.head_object, Bucket=self.bucket, Key=names[index])
                    found[index] = True
                except ClientError as exc:
                    if _code(exc) not in _MISSING_KEY:
                        raise

        if len(names) == 1:
            await head(0)
        else:
            await run_all(head(index) for index in range(len(names)))
        self._counters["heads"] += len(names)
        return found

    async def delete(self, keys: Sequence[str]) -> int:
        return await self._call(self._delete, [self._key(key) for key in keys])

    async def _delete(self, names: list[str]) -> int:
        """DeleteObjects in batches; S3 reports a key as deleted whether or not it existed."""
        deleted = 0
        for start in range(0, len(names), DELETE_BATCH):
            batch = names[start : start + DELETE_BATCH]
            async with self._limited():
                answer = await self._send(
                    self._client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": name} for name in batch], "Quiet": False},
                )
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise TierUnavailable(
                    f"s3 {self.endpoint} bucket {self.bucket!r}: could not delete {len(errors)} objects "
                    f"(first {first.get('Key')}: {first.get('Code')}: {first.get('Message')})"
                )
            deleted += len(answer.get("Deleted") or [])
        self._counters["deleted"] += deleted
        return deleted

    async def health(self) -> None:
        await self.exists(["lmplug:health"])

    def statistics(self) -> dict[str, float]:
        return {name: float(value) for name, value in self._counters.items()}


# ---------------------------------------------------------------------------- helpers


_loader_lock = threading.Lock()
_loader: Any = None


def _session() -> Any:
    """A new botocore session per client (sessions are not thread-safe), sharing one loader of the
    service models: loading them again costs every connector ~0.2 s."""
    global _loader
    session = get_session()
    with _loader_lock:
        if _loader is None:
            _loader = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _loader)
    return session


def _send_body_at_once(params: dict[str, Any], **_: Any) -> None:
    params.get("headers", {}).pop("Expect", None)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _retryable(exc: Exception) -> bool:
    """A dropped connection (a server restarted, a keep-alive closed) or the server asking to try again."""
    if isinstance(exc, ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or _code(exc) in _TRY_AGAIN
    return isinstance(exc, ConnectionClosedError | EndpointConnectionError | aiohttp.ServerDisconnectedError)
