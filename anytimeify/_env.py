"""Reading environment variables on the engine's hot path.

The engine asks for a few variables (``ANYTIMEIFY_NO_EXT``, ``ANYTIMEIFY_TUNE``, the cache folder)
at every conv it runs, so that changing them takes effect at once. ``os.environ.get`` encodes the
name and decodes the value each time (about 2 us, thousands of times per forward of a small
network); :func:`getenv` looks the pre-encoded name up in the mapping ``os.environ`` keeps, which
is the same mapping ``os.environ[...] = ...``, ``os.putenv``-free assignments and
``monkeypatch.setenv`` update, so it always returns what ``os.environ.get`` would.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

__all__ = ["getenv"]

_KEYS: Dict[str, object] = {}


def _fast(name: str, default: Optional[str] = None) -> Optional[str]:
    environ = os.environ
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = environ.encodekey(name)
    value = environ._data.get(key)
    return default if value is None else environ.decodevalue(value)


def _portable(name: str, default: Optional[str] = None) -> Optional[str]:
    return os.environ.get(name, default)


#: ``getenv(name, default=None)``: ``os.environ.get(name, default)``, faster where CPython's
#: ``os._Environ`` internals are there (every CPython since 3.2), else ``os.environ.get`` itself
getenv = _fast if all(hasattr(os.environ, a) for a in ("_data", "encodekey", "decodevalue")) else _portable
