"""Every WebSocket close code ChatStream sends, in one place: the gateway and the brokers both close client
sockets, and a client reads one table (docs/protocol.md, "Close codes"; 4001, 4003, 4008 and 1009 are the
public interface's, docs/interface.md). A new code is added here and in that table together."""

from __future__ import annotations

CLOSE_TOO_LARGE = 1009  # a frame over 64 KiB (checked while it is read)
CLOSE_INTERNAL = 1011  # the broker could not set the connection up, or a bug while handling a frame
CLOSE_UPSTREAM_LOST = 1012  # gateway: the broker vanished without a close frame (killed): reconnect at once
CLOSE_TRY_AGAIN = 1013  # gateway: no broker available (all gone or their breakers open): reconnect after a pause
CLOSE_BAD_TICKET = 4001  # missing, unknown, expired or reused ticket
CLOSE_FORBIDDEN = 4003  # the gateway's route authorization
CLOSE_RATE_LIMITED = 4008  # too many frames refused in a row, or the user's frame budget across sockets
CLOSE_TOO_SLOW = 4009  # the client does not read what it is sent
CLOSE_SESSION_ENDED = 4010  # logout, password change or account removal ended the user's sessions
CLOSE_TOO_MANY_SOCKETS = 4011  # the user already holds the most sockets allowed
