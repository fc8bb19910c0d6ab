"""Server -> client frames (docs/protocol.md) and the brokers' control messages. Pure: no I/O.

Stream events are turned into frames by string splicing of the payload the write path already encoded
(``d`` of the entry, compact JSON of a dict), not by ``json.loads`` + ``json.dumps``: a frame is built
once per event per broker and the same ``str`` is handed to every local receiver (docs/adr/0020, the probe).
"""

from __future__ import annotations

import json
from typing import Any

# The one Redis pub/sub channel every broker listens on (core/keys.py says why one).
from core.keys import CONTROL_CHANNEL as CONTROL_CHANNEL

# One encoder for every frame: ``json.dumps`` with arguments builds a new JSONEncoder per call, a few µs of
# a broker's work per ack (docs/benchmarks.md, issue 16, session 9); ``encode`` gives the same text.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(obj: Any) -> str:
    return _ENCODER.encode(obj)


def frame(type: str, **fields: Any) -> str:
    return dumps({"type": type, **fields})


def event_frame(*, type: str, conversation_id: str, seq: int, payload_json: str) -> str | None:
    """The frame of one stream event, or None if the entry is not one clients see.

    ``payload_json`` is the entry's ``d`` field (a compact JSON object written by ``streams.event_append``).
    ``message.*`` frames carry the event's ``conversation_id`` and ``seq`` at the top level (for gap
    detection), and the message in ``message``; ``message.new`` also has ``seq`` inside the message.
    """
    if not payload_json.startswith("{") or not payload_json.endswith("}"):
        return None
    head = f'{{"type":"{type}","conversation_id":"{conversation_id}","seq":{seq},'
    if type == "message.new":
        return f'{head}"message":{payload_json[:-1]},"seq":{seq}}}}}'
    if type in ("message.edited", "message.deleted"):
        return f'{head}"message":{payload_json}}}'
    if type in ("reaction.added", "reaction.removed"):
        # {id (the message's), conversation_id, user_id, emoji, user_ids (all with that emoji now), at}
        return f'{head}"reaction":{payload_json}}}'
    if type == "read.updated":
        # The payload is {conversation_id, user_id, seq}: here seq is the reader's cursor, not an event seq.
        return f'{{"type":"read.updated",{payload_json[1:]}'
    return None


def ws_wire(payload: bytes) -> bytes:
    """``payload`` as one complete, unmasked, uncompressed WebSocket text frame (RFC 6455 §5.2), ready for a
    transport's ``write``. A server's frames are never masked, so the bytes are the same for every receiver:
    the hub frames each fan-out once instead of once per receiver. Precondition: valid UTF-8 and no
    permessage-deflate negotiated on the connection (brokers do not offer it, see chatstream_site roles)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def message_frame_from_document(doc: dict[str, Any]) -> str:
    """A ``message.new`` frame for a message read back from MongoDB (resume beyond the stream).

    MongoDB holds a message's final state, not its edit events: an edited message carries ``edited_at`` and
    its current content, a deleted one ``deleted: true`` and empty content; a reply its quote (``reply_to``,
    as sent), a reacted one its ``reactions`` ([{emoji, count, user_ids}]).
    """
    message = {
        "id": doc["id"], "conversation_id": doc["conversation_id"], "sender_id": doc["sender_id"],
        "content": doc["content"], "timestamp": doc["timestamp"], "client_msg_id": doc.get("client_msg_id"),
        "seq": doc["seq"], "mentions": list(doc.get("mentions") or ()),
    }
    if doc.get("edited_at"):
        message["edited_at"] = doc["edited_at"]
    if doc.get("deleted"):
        message["deleted"] = True
    if doc.get("reply_to"):
        message["reply_to"] = doc["reply_to"]
    if doc.get("reactions") and not doc.get("deleted"):
        message["reactions"] = doc["reactions"]
    return frame("message.new", conversation_id=doc["conversation_id"], seq=doc["seq"], message=message,
                 source="archive")


# ------------------------------------------------------------------ control messages between brokers


def control_typing(*, conversation_id: str, user_id: str) -> str:
    return dumps({"k": "typing", "c": conversation_id, "u": user_id})


def control_presence(*, user_id: str, status: str, conversation_ids: list[str]) -> str:
    return dumps({"k": "presence", "u": user_id, "s": status, "c": conversation_ids})


def control_members(*, user_ids: list[str], conversation_id: str) -> str:
    return dumps({"k": "members", "u": user_ids, "c": conversation_id})


def control_invalidate(*, conversation_id: str) -> str:
    return dumps({"k": "invalidate", "c": conversation_id})


# A user's sessions ended elsewhere (logout, password change, account removal): every socket of theirs is
# closed with CLOSE_SESSION_ENDED, on every broker (docs/protocol.md, docs/adr/0027).
SESSIONS_CLOSE = "sessions.close"


def user_group(user_id: str) -> str:
    """The channel-layer group of a user: the brokers holding one of their sockets (docs/adr/0027). Pure."""
    return f"cs.user.{user_id}"
