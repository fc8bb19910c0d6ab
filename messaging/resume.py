"""Resume (docs/protocol.md, "resume"): after a reconnect a client names ``{conversation_id: last_seq}`` and
gets every event after those seqs, in order, from the archive in MongoDB and then the stream, then the live
events that arrived meanwhile, then ``resumed``; nothing is lost, repeated or reordered at the seam.

Functions of the connection (``messaging.consumers.ChatConsumer``), which holds the state they use (the
conversations it may read, live events buffered while a conversation resumes, its send budget).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async

from core.closecodes import CLOSE_TOO_SLOW
from core.errors import NotFound, ValidationFailed
from messaging import frames, selectors, streams

if TYPE_CHECKING:
    from messaging.consumers import ChatConsumer

# A resume names at most this many conversations (a frame of 1,000 ids is ~40 KB, under the frame limit).
RESUME_MAX_CONVERSATIONS = 1000


async def resume_handle(self: ChatConsumer, data: dict[str, Any], ref: Any) -> None:
    """The ``resume`` frame: validate it, then resume each named conversation of the connection in turn
    (a stranger's conversation gets a ``not_found`` error frame); one backward read per partition."""
    wanted = data.get("conversations")
    if not isinstance(wanted, dict) or len(wanted) > RESUME_MAX_CONVERSATIONS:
        raise ValidationFailed(f"conversations must be an object of at most {RESUME_MAX_CONVERSATIONS} "
                               "{conversation_id: last_seq}", details={"field": "conversations"})
    for conversation_id, after in wanted.items():
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValidationFailed("each last_seq must be a non-negative integer",
                                   details={"field": "conversations", "conversation_id": conversation_id})
    # One backward read per partition for the whole frame, not one per conversation (docs/security.md).
    mine = {c: a for c, a in wanted.items() if c in self.conversations}
    scan = selectors.ResumeScan(self.hub.redis, wanted=mine)
    for conversation_id, after in wanted.items():
        if conversation_id not in mine:
            await self._error(NotFound("no such conversation", details={"conversation_id": conversation_id}),
                              ref=ref)
            continue
        await _resume_one(self, conversation_id=conversation_id, after=after, scan=scan)

async def _resume_one(self: ChatConsumer, *, conversation_id: str, after: int, scan: selectors.ResumeScan) -> None:
    """Send the conversation's events after ``after`` in seq order (archive, then stream), then the live
    events that arrived meanwhile, then ``resumed``. Live delivery of this conversation is held (buffered)
    for the duration, so nothing is lost, repeated or reordered at the seam."""
    self.resuming[conversation_id] = []
    upto = after
    try:
        last = await streams.last_accepted_seq(self.hub.redis, conversation_id=conversation_id)
        tail = await scan.events_after(conversation_id=conversation_id, last_seq=last)
        if not tail.complete:
            before = tail.events[0].seq if tail.events else last + 1
            cursor = after
            while not self.closing:
                page = await sync_to_async(selectors.archived_messages, thread_sensitive=False)(
                    conversation_id=conversation_id, after_seq=cursor, before_seq=before)
                for doc in page:
                    await _send_paced(self, frames.message_frame_from_document(doc))
                    upto = cursor = doc["seq"]
                if len(page) < selectors.ARCHIVE_PAGE:
                    break
        for event in tail.events:
            frame = frames.event_frame(type=event.type, conversation_id=conversation_id, seq=event.seq,
                                       payload_json=event.payload_json)
            if frame is not None:
                await _send_paced(self, frame)
            upto = event.seq
    finally:
        buffered = self.resuming.pop(conversation_id, [])
    for seq, frame in buffered:
        if seq == 0 or seq > upto:
            await self.send_frame(frame)
            upto = max(upto, seq)
    self.resumed_upto[conversation_id] = upto
    await self.send_frame(frames.frame("resumed", conversation_id=conversation_id, last_seq=upto))

async def _send_paced(self: ChatConsumer, frame: str) -> None:
    """Send a resume frame, waiting (bounded) while the client has not taken what was already sent."""
    limit = self.send_limit // 2
    self.paced += 1
    if self.paced % 50 == 0:
        await asyncio.sleep(0)  # one loop turn: lets Twisted hand what is queued to the kernel
    for _ in range(200):  # 200 x 50 ms: a client that takes nothing for 10 s is too slow
        if self.out.backlog() <= limit:
            await self.send_frame(frame)
            return
        await asyncio.sleep(0.05)
    await self._close(CLOSE_TOO_SLOW)
