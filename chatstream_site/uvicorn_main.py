"""``python -m chatstream_site.uvicorn_main ARGS``: uvicorn's own command line, whose ``--ws websockets-sansio``
protocol keeps its per-connection attributes in ``__slots__`` (docs/adr/0054). The WebSocket roles (brokers,
gateways) run this instead of the ``uvicorn`` script (chatstream_site/management/commands/role.py).

Why (issue 16, memory per idle connection): uvicorn's websockets-sansio protocol sets 37 attributes on every
connection, past the 30 keys that CPython 3.11 lets a class's instances share, so every connection carried a dict
of its own: 1.6 KB of a proxied socket's ~13 KB of Python objects in a gateway (bench/ws_memory.py --gateway).
Slots declared by a subclass hold the same attributes at 8 bytes each and the inherited ``__dict__`` is never
allocated. Not one method is overridden: the behaviour is uvicorn's.

With ``--reuse-port`` (this module's one option, taken out before uvicorn reads the rest) the listening socket is
bound with SO_REUSEPORT, so that the gateways of one machine share one port and the kernel spreads new connections
over those alive: one of them killed, the other keeps accepting (docs/adr/0056).

Only for the uvicorn releases messaging/transports.py was tested with (``TESTED``): the attribute names below are
that release's. With another release the stock class serves (each attribute then simply lands in the dict again),
and messaging/transports.py's one warning says what to re-check.
"""

from __future__ import annotations

import logging
import socket
import sys

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

# Every attribute uvicorn 0.54's WebSocketsSansIOProtocol sets on its instances (its __init__ and handlers; the
# list a test checks against a live connection: tests/realtime/test_uvicorn_slots.py).
PROTOCOL_ATTRIBUTES = (
    "app", "app_state", "asgi_version", "client", "close_sent", "close_timeout", "close_timer", "config", "conn",
    "connections", "curr_msg_data_type", "default_headers", "disconnected", "frames", "handshake_complete",
    "handshake_initiated", "initial_response", "last_ping_rtt", "logger", "loop", "pending_ping_payload",
    "ping_interval", "ping_sent_at", "ping_timeout", "ping_timer", "pong_timer", "queue", "read_paused",
    "request", "response", "root_path", "scheme", "scope", "server", "tasks", "transport", "writable")


class SlottedWebSocketsSansIOProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, its instance attributes in slots (see the module docstring)."""

    __slots__ = PROTOCOL_ATTRIBUTES


def ws_protocol_install() -> bool:
    """Make uvicorn's ``websockets-sansio`` choice this module's class, when the installed uvicorn is a tested
    release and ``CHATSTREAM_UVICORN_SLOTS`` is not false (.env.example; a benchmark compares the two in one run:
    ``bench.connects --gateway-env 2:CHATSTREAM_UVICORN_SLOTS=false``). Returns whether it did. Side effect: one
    entry of ``uvicorn.config.WS_PROTOCOLS``, which uvicorn reads when its ``Config`` loads (before the app and
    any connection)."""
    from uvicorn import config

    from chatstream_site.env import env_bool
    from messaging.transports import internals_known

    if not env_bool("CHATSTREAM_UVICORN_SLOTS", True) or not internals_known("uvicorn"):
        return False
    # By module path, not __name__: run with -m this module is __main__, and uvicorn imports the class by name.
    config.WS_PROTOCOLS["websockets-sansio"] = "chatstream_site.uvicorn_main:SlottedWebSocketsSansIOProtocol"
    return True


REUSE_PORT_OPTION = "--reuse-port"


def listen_socket_shared(*, host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT (and SO_REUSEADDR, as uvicorn binds), not yet
    listening: uvicorn's ``create_server(sock=...)`` calls ``listen`` with its backlog. Every process that binds
    the same address this way (same user: Linux's rule) gets a share of its new connections; none gets those a
    dead one had not accepted yet. Raises OSError when the address is held without SO_REUSEPORT (another
    program) or cannot be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def shared_port_install() -> None:
    """Make ``uvicorn.main.run`` serve on :func:`listen_socket_shared` instead of binding its own socket. Side
    effect: replaces ``uvicorn.main.Server`` (read by ``run`` when it starts the server) with a subclass that
    passes the shared socket to uvicorn's own ``sockets`` path (the one gunicorn's workers use)."""
    import importlib

    from uvicorn.server import Server

    # By importlib: the package's attribute ``uvicorn.main`` is the click command, not the module.
    uvicorn_main = importlib.import_module("uvicorn.main")

    class SharedPortServer(Server):
        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            if sockets is None:
                try:
                    sockets = [listen_socket_shared(host=self.config.host, port=self.config.port)]
                except OSError as exc:
                    # What uvicorn does when its own bind fails: one line, exit code 3 (supervisord retries).
                    logging.getLogger("uvicorn.error").error("%s:%s: %s", self.config.host, self.config.port, exc)
                    sys.exit(3)
            await super().serve(sockets=sockets)

    uvicorn_main.Server = SharedPortServer  # type: ignore[attr-defined]  # the module, not the command


if __name__ == "__main__":
    from uvicorn.main import main

    ws_protocol_install()
    if REUSE_PORT_OPTION in sys.argv:
        sys.argv.remove(REUSE_PORT_OPTION)
        shared_port_install()
    main()
