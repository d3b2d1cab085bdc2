"""``s3://bucket/prefix``: chunks as objects in an S3-compatible bucket (AWS S3, MinIO, Ceph, SeaweedFS).

The scheme registers with its options model only; the connector, and aiobotocore with it, is
imported when a tier with an ``s3://`` URL is built (``pip install 'lmplug-remote[s3]'``).
"""

from __future__ import annotations

from lmplug.tierkit import RemoteConnector, RemoteScheme
from lmplug_remote.extras import library_missing
from lmplug_remote.s3.options import S3Options

__all__ = ["SCHEME", "S3Options"]


def _connector(url: str, options: S3Options) -> RemoteConnector:
    try:
        from lmplug_remote.s3.connector import S3Connector
    except ModuleNotFoundError as exc:
        raise library_missing(exc, "s3:// URLs", "s3") from exc
    return S3Connector(url, options)


SCHEME = RemoteScheme(
    ("s3",),
    S3Options,
    _connector,
    "S3-compatible object store (AWS S3, MinIO, Ceph, SeaweedFS) through aiobotocore; s3://bucket/prefix",
)
