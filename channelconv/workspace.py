"""The byte budget of im2col's column buffer (and of the 1x1 algorithm's strided gather).

The buffer covers one image's band of output rows at a time; it never exceeds this limit.
Default 256 MiB, or the CHANNELCONV_WORKSPACE_LIMIT environment variable (bytes) at import.
"""

from __future__ import annotations

import numbers
import os

DEFAULT_WORKSPACE_LIMIT = 256 << 20
_ENV = "CHANNELCONV_WORKSPACE_LIMIT"


def _checked(nbytes, name: str) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral) or nbytes <= 0:
        raise ValueError(f"expected {name} to be a positive number of bytes, but got {name}={nbytes!r}")
    return int(nbytes)


def _from_environment() -> int:
    text = os.environ.get(_ENV)
    if text is None:
        return DEFAULT_WORKSPACE_LIMIT
    try:
        value = int(text)
    except ValueError:
        value = text
    return _checked(value, _ENV)


_limit = _from_environment()


def set_workspace_limit(nbytes: int) -> None:
    """Caps the im2col column buffer at ``nbytes`` bytes (at least one output row's worth)."""
    global _limit
    _limit = _checked(nbytes, "nbytes")


def get_workspace_limit() -> int:
    return _limit
