"""Options of the ``s3://`` connector (pydantic only: read when the plugin registers its schemes)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, PositiveInt, SecretStr, model_validator

from lmplug.tierkit import ByteSize, Duration, StrictModel

__all__ = ["MIN_PART_SIZE", "MiB", "S3Options"]

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB
"""S3 refuses a multipart part below 5 MiB (all but the last)."""


class S3Options(StrictModel):
    """Options of an ``s3://bucket/prefix`` connector (the tier's ``connector:`` section)."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3 API endpoint, e.g. http://minio:9000; unset: AWS S3 of `region`.",
    )
    region: str = Field(default="us-east-1", min_length=1, description="Region to sign requests for.")
    access_key_id: str | None = Field(
        default=None, description="Access key; unset: the AWS credential chain (AWS_* environment, ~/.aws, IAM role)."
    )
    secret_access_key: SecretStr | None = Field(default=None, description="Secret key; set with access_key_id.")
    session_token: SecretStr | None = Field(default=None, description="Session token of temporary credentials.")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto",
        description="Bucket in the path or the host name; auto: path with endpoint_url, virtual on AWS.",
    )
    multipart_threshold: ByteSize = Field(
        default=16 * MiB, ge=MIN_PART_SIZE, description="Values this large or larger go up as multipart uploads."
    )
    part_size: ByteSize = Field(
        default=8 * MiB, ge=MIN_PART_SIZE, le=5 * 1024 * MiB, description="Size of one multipart part (>= 5 MiB)."
    )
    max_concurrency: PositiveInt = Field(default=16, description="Requests in flight at once (parts, HEADs, GETs).")
    create_bucket: bool = Field(
        default=False, description="Create a missing bucket at first use; false: a missing bucket is an error."
    )
    connect_timeout: Duration = Field(default=3.0, gt=0, description="Limit of opening one connection.")
    read_timeout: Duration = Field(default=30.0, gt=0, description="Limit of one socket read.")
    max_attempts: PositiveInt = Field(
        default=3, description="Tries per request while it fails for a passing reason (dropped connection, 5xx)."
    )
    verify_tls: bool = Field(default=True, description="Verify the endpoint's TLS certificate (https).")

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> Self:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key are set together (or both left to the AWS chain)")
        return self
