"""Fan-out: who is online, and delivering frames to them.

Theory of operation
-------------------
The hub is the in-process registry of live sessions: by session id (for
replies), by user (every device of a user), by shop topic (supervisor
dashboards, workers), and by watched user (presence). Actors publish a frame
once; the hub encodes it once into a WebSocket frame and hands the same bytes
to every recipient session's outbox. Delivery never blocks: a session whose
outbox is full is cut off as a slow consumer (it resumes losslessly), so one
slow reader never delays the others.

Recipients of a conversation frame are its participants (customer, assigned
agent, group members) -- those of their sessions whose token may read the
conversation (``policy.can_read``: a member of another shop's group gets
nothing) -- plus the sessions subscribed to the matching topic of the
conversation's shop. A cluster engine replaces this class with one that
also forwards to the other processes (Redis pub/sub) behind the same methods.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from typing import Protocol

from protocol import (
    Conversation,
    MemberRole,
    Presence,
    PresenceEvent,
    Role,
    ServerFrameType,
    Topic,
    encode,
)

from ..gateway._frame import binary_frame
from ..metrics import METRICS
from ..policy import Identity, can_read
from ..shards._commands import ReplyTo


class Peer(Protocol):
    """What the hub needs of a session."""

    @property
    def id(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def identity(self) -> Identity | None: ...

    def send_frame(self, frame: ServerFrameType) -> None:
        """Encode and queue one frame for this session only (replies)."""

    def push_event(self, conv: str, seq: int, data: bytes) -> None:
        """Queue an event already framed for WebSocket (shared bytes); ``seq`` > 0
        for messages, so that a resuming session can drop what it replays itself."""


class Hub:
    def __init__(self) -> None:
        self.sessions: dict[str, Peer] = {}
        self.by_user: dict[str, dict[str, Peer]] = {}
        self.topics: dict[tuple[str, Topic], dict[str, Peer]] = {}
        self.watchers: dict[str, dict[str, Peer]] = {}
        self.last_seen: dict[str, int] = {}
        # What each session subscribed to, so that leaving costs O(its own subscriptions).
        self._topics_of: dict[str, set[tuple[str, Topic]]] = {}
        self._watched_by: dict[str, set[str]] = {}

    # -------------------------------------------------------- registration

    def register(self, peer: Peer) -> list[Peer]:
        """Add a session; returns the user's other sessions (oldest first)."""
        self.sessions[peer.id] = peer
        devices = self.by_user.setdefault(peer.user, {})
        others = list(devices.values())
        devices[peer.id] = peer
        METRICS.sessions.set(len(self.sessions))
        if not others:
            self._presence_changed(peer.user)
        return others

    def unregister(self, peer: Peer) -> None:
        if self.sessions.pop(peer.id, None) is None:
            return
        devices = self.by_user.get(peer.user, {})
        devices.pop(peer.id, None)
        for key in self._topics_of.pop(peer.id, ()):
            subscribers = self.topics.get(key)
            if subscribers is not None:
                subscribers.pop(peer.id, None)
                if not subscribers:
                    del self.topics[key]
        for user in self._watched_by.pop(peer.id, ()):
            watchers = self.watchers.get(user)
            if watchers is not None:
                watchers.pop(peer.id, None)
                if not watchers:
                    del self.watchers[user]
        METRICS.sessions.set(len(self.sessions))
        if not devices:
            self.by_user.pop(peer.user, None)
            self.last_seen[peer.user] = int(time.time() * 1000)
            self._presence_changed(peer.user)

    def subscribe(self, peer: Peer, shop: str, topic: Topic) -> None:
        self.topics.setdefault((shop, topic), {})[peer.id] = peer
        self._topics_of.setdefault(peer.id, set()).add((shop, topic))

    def watch(self, peer: Peer, users: Iterable[str]) -> list[Presence]:
        result = []
        watched = self._watched_by.setdefault(peer.id, set())
        for user in users:
            self.watchers.setdefault(user, {})[peer.id] = peer
            watched.add(user)
            result.append(self.presence(user))
        return result

    def unsubscribe(self, peer: Peer, shop: str, topic: Topic) -> None:
        key = (shop, topic)
        self._topics_of.get(peer.id, set()).discard(key)
        subscribers = self.topics.get(key)
        if subscribers is not None:
            subscribers.pop(peer.id, None)
            if not subscribers:
                del self.topics[key]

    def unwatch(self, peer: Peer, users: Iterable[str]) -> None:
        watched = self._watched_by.get(peer.id, set())
        for user in users:
            watched.discard(user)
            watchers = self.watchers.get(user)
            if watchers is not None:
                watchers.pop(peer.id, None)
                if not watchers:
                    del self.watchers[user]

    def watched_count(self, peer: Peer) -> int:
        return len(self._watched_by.get(peer.id, ()))

    def staff_of(self, shop: str, users: Iterable[str], roles: Collection[Role]) -> set[str]:
        """Those of ``users`` connected now with a ``roles`` token of ``shop``."""
        return {
            user
            for user in users
            if any(
                (who := peer.identity) is not None and who.shop == shop and who.role in roles
                for peer in self.by_user.get(user, {}).values()
            )
        }

    def presence(self, user: str) -> Presence:
        devices = len(self.by_user.get(user, ()))
        return Presence(
            user=user, online=devices > 0, devices=devices, last_seen=self.last_seen.get(user, 0)
        )

    def is_online(self, user: str) -> bool:
        return user in self.by_user

    def _presence_changed(self, user: str) -> None:
        watchers = self.watchers.get(user)
        if watchers:
            self._push(
                watchers.values(), "", 0, encode(PresenceEvent(presence=self.presence(user)))
            )

    # ------------------------------------------------------------ delivery

    def reply(self, to: ReplyTo, frame: ServerFrameType) -> None:
        peer = self.sessions.get(to.session)
        if peer is not None:
            peer.send_frame(frame)

    def send_to_user(self, user: str, frame: ServerFrameType) -> None:
        devices = self.by_user.get(user)
        if devices:
            self._push(devices.values(), "", 0, encode(frame))

    def publish(
        self,
        conv: Conversation,
        members: Mapping[str, MemberRole],
        frame: ServerFrameType,
        *,
        topic: Topic | None,
        seq: int = 0,
        exclude_session: str = "",
        exclude_user: str = "",
    ) -> int:
        """Deliver ``frame`` about ``conv`` to its participants and the topic's
        subscribers (none when ``topic`` is None); returns how many sessions got it."""
        recipients: dict[str, Peer] = {}
        for user in _participants(conv, members):
            if user != exclude_user and (devices := self.by_user.get(user)):
                for session, peer in devices.items():
                    # by its token: a user id may hold tokens of several shops
                    if (who := peer.identity) is not None and can_read(who, conv, members):
                        recipients[session] = peer
        if topic is not None and (subscribers := self.topics.get((conv.shop, topic))):
            recipients.update(subscribers)
        recipients.pop(exclude_session, None)
        if recipients:
            self._push(recipients.values(), conv.id, seq, encode(frame))
        return len(recipients)

    def broadcast_shop(self, shop: str, topic: Topic, frame: ServerFrameType) -> None:
        subscribers = self.topics.get((shop, topic))
        if subscribers:
            self._push(subscribers.values(), "", 0, encode(frame))

    @staticmethod
    def _push(peers: Iterable[Peer], conv: str, seq: int, payload: bytes) -> None:
        data = binary_frame(payload)
        count = 0
        for peer in peers:
            peer.push_event(conv, seq, data)
            count += 1
        METRICS.hot.frames_out += count


def _participants(conv: Conversation, members: Mapping[str, MemberRole]) -> Iterable[str]:
    if conv.customer:
        yield conv.customer
    if conv.agent and conv.agent not in members:
        yield conv.agent
    yield from members
