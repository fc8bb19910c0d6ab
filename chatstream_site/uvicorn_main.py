"""``python -m chatstream_site.uvicorn_main ARGS``: uvicorn's own command line, whose ``--ws websockets-sansio``
protocol keeps its per-connection attributes in ``__slots__`` (docs/adr/0054). The WebSocket roles (brokers,
gateways) run this instead of the ``uvicorn`` script (chatstream_site/management/commands/role.py).

Why (issue 16, memory per idle connection): uvicorn's websockets-sansio protocol sets 37 attributes on every
connection, past the 30 keys that CPython 3.11 lets a class's instances share, so every connection carried a dict
of its own: 1.6 KB of a proxied socket's ~13 KB of Python objects in a gateway (bench/ws_memory.py --gateway).
Slots declared by a subclass hold the same attributes at 8 bytes each and the inherited ``__dict__`` is never
allocated. Not one method is overridden: the behaviour is uvicorn's.

Only for the uvicorn releases messaging/transports.py was tested with (``TESTED``): the attribute names below are
that release's. With another release the stock class serves (each attribute then simply lands in the dict again),
and messaging/transports.py's one warning says what to re-check.
"""

from __future__ import annotations

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


if __name__ == "__main__":
    from uvicorn.main import main

    ws_protocol_install()
    main()
