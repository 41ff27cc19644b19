"""Serve optuna-dashboard on a study's storage and artifact store, with a clean stop.

The server is optuna-dashboard's own WSGI app (:func:`optuna_dashboard.wsgi`) behind a threaded
:mod:`wsgiref` server running in a daemon thread of this process, so :meth:`DashboardHandle.stop`
shuts it down cleanly (no child process to kill) and the request log goes to :mod:`logging`, not
to the terminal. Checkpoints stored as Optuna artifacts can be seen and downloaded from each
trial's page.

Reading a study that another process is writing: the default ``JournalFileBackend`` file is
append-only and safe to read while workers write; an RDB server (PostgreSQL/MySQL) is too.
``sqlite:///`` works, but a reader can meet ``database is locked`` while a worker writes: the
handle carries a warning saying so.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from kdsearch.errors import ConfigError

__all__ = ["DashboardHandle", "start_dashboard"]

_log = logging.getLogger(__name__)


class _QuietHandler(WSGIRequestHandler):
    """Request lines go to the debug log instead of stderr (the CLI owns the terminal)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        _log.debug("dashboard %s - %s", self.address_string(), format % args)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # the browser keeps connections open; do not block shutdown on them
    allow_reuse_address = True


@dataclass
class DashboardHandle:
    """A running dashboard: ``url`` to open, :meth:`stop` to shut it down, :meth:`wait` to block."""

    url: str
    host: str
    port: int
    storage_url: str
    artifact_dir: Path | None
    warnings: list[str] = field(default_factory=list)
    _server: WSGIServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the server stops (Ctrl-C raises KeyboardInterrupt in the caller)."""
        thread = self._thread
        if thread is None:
            return
        if timeout is not None:
            thread.join(timeout)
            return
        while thread.is_alive():  # join() in short slices so Ctrl-C reaches the main thread
            thread.join(0.5)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, close the socket and join the thread. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> DashboardHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def start_dashboard(
    storage_url: str,
    artifact_dir: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8080,
) -> DashboardHandle:
    """Start optuna-dashboard for ``storage_url`` in a background thread; return its handle.

    ``artifact_dir`` is the study's FileSystemArtifactStore folder (``<run_dir>/<study>/artifacts``)
    so stored checkpoints can be downloaded; ``None`` or a missing folder serves without artifacts
    (with a warning on the handle). ``port=0`` picks a free port. A port in use is a
    :class:`~kdsearch.errors.ConfigError` naming ``--port``.
    """
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    from kdsearch.storage import open_storage

    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError("--port", "must be an integer in [0, 65535] (0 = any free port)", port)
    warnings: list[str] = []
    if storage_url.startswith("sqlite:"):
        warnings.append(
            "sqlite storage: while a worker writes, the dashboard can meet 'database is locked'; "
            "the default journal file (or PostgreSQL) is safe to watch live"
        )
    storage = open_storage(storage_url, create=False)
    store = None
    art = Path(artifact_dir) if artifact_dir is not None else None
    if art is not None and art.is_dir():
        store = FileSystemArtifactStore(str(art))
    else:
        warnings.append(
            f"no artifact folder at {str(art)!r}: checkpoints cannot be downloaded from the dashboard"
            if art is not None
            else "no artifact folder given: checkpoints cannot be downloaded from the dashboard"
        )
    app = optuna_dashboard.wsgi(storage, artifact_store=store)
    try:
        server = make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        rule = "is already in use" if getattr(exc, "errno", None) in (98, 48, 10048) else f"cannot be bound ({exc.strerror or exc})"
        raise ConfigError("--port", f"{rule} on {host}", port, "choose another --port (or 0 for any free port)") from None
    except socket.gaierror as exc:  # pragma: no cover - OSError subclass, kept for clarity
        raise ConfigError("--host", f"cannot be resolved ({exc})", host) from None
    actual_port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"kdsearch-dashboard-{actual_port}", daemon=True)
    thread.start()
    for w in warnings:
        _log.warning(w)
    return DashboardHandle(
        url=f"http://{_url_host(host)}:{actual_port}/dashboard/",
        host=host,
        port=actual_port,
        storage_url=storage_url,
        artifact_dir=art,
        warnings=warnings,
        _server=server,
        _thread=thread,
    )
