"""Options of the ``lm://`` connector (pydantic only: read when the plugin registers its schemes)."""

from __future__ import annotations

from pydantic import Field, PositiveInt

from lmplug.tierkit import Duration, StrictModel

__all__ = ["LmOptions"]


class LmOptions(StrictModel):
    """Options of an ``lm://`` remote tier's ``connector:`` section."""

    auth_token: str | None = Field(
        default=None, description="Token the server requires (default: $LMPLUG_SERVER_TOKEN; none if unset)."
    )
    connections: PositiveInt = Field(default=8, description="Connections kept open; more calls at once wait for one.")
    connect_timeout: Duration = Field(default=2.0, gt=0, description="Limit of opening one connection (and AUTH).")
