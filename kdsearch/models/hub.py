"""Is the Hugging Face Hub reachable? Asked once, with a short timeout, before timm downloads.

Offline, the hub client retries every file with back-off (about a minute per teacher) before it
gives up. :func:`hub_unreachable_reason` answers at once when ``HF_HUB_OFFLINE`` is set, or after
one TCP connect to the hub's endpoint (or to the HTTPS proxy, when one is set) with a timeout of
:data:`PROBE_TIMEOUT_S`; name resolution runs inside the same time limit. :func:`hub_offline`
then runs timm in the hub client's offline mode: weights already in the local cache still load,
and missing ones fail at once instead of after the retries.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

__all__ = ["PROBE_TIMEOUT_S", "hub_unreachable_reason", "hub_offline"]

PROBE_TIMEOUT_S = 2.5
"""Seconds the one reachability probe may take (name resolution and TCP connect together)."""

_TRUE = {"1", "on", "yes", "true"}


def _offline_by_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _probe_target() -> tuple[str, int, str]:
    """(host, port, label): the HTTPS proxy when one is set, else the hub's endpoint."""
    import huggingface_hub

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), None)
    url = urlsplit(proxy if proxy else huggingface_hub.constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme in ("https", "") else 80)
    return host, port, ("proxy " if proxy else "") + f"{host}:{port}"


@functools.lru_cache(maxsize=8)
def _probe(host: str, port: int, label: str) -> str | None:
    """Why ``host:port`` cannot be reached, or ``None``; once per target and process."""
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                outcome.append(None)
        except OSError as exc:
            outcome.append(f"cannot connect to {label}: {exc.strerror or exc}")

    # getaddrinfo has no timeout of its own: the thread bounds it (a daemon, left to finish alone).
    probe = threading.Thread(target=connect, name="kdsearch-hub-probe", daemon=True)
    probe.start()
    probe.join(PROBE_TIMEOUT_S)
    if not outcome:
        return f"no answer from {label} within {PROBE_TIMEOUT_S:g} s"
    return outcome[0]


def hub_unreachable_reason() -> str | None:
    """``None`` when the hub answers; else why not (``HF_HUB_OFFLINE`` set, no route, timeout).

    The environment is read on every call; the network probe runs once per target and process.
    """
    import huggingface_hub

    if _offline_by_env() or huggingface_hub.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    return _probe(*_probe_target())


@contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """Run the block in the hub client's offline mode: only the local cache is read.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, when it is imported (timm imports it), so
    the switch is its public ``constants.HF_HUB_OFFLINE``, which every request checks.
    """
    if not enabled:
        yield
        return
    import huggingface_hub

    before = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = before
