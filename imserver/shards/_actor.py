"""The conversation actor: the one writer of one conversation.

Theory of operation
-------------------
Every command about a conversation reaches its actor's bounded mailbox
(through the shard queue). The actor is a loop:

1. take a batch: wait for one command, then take whatever else is already
   waiting (up to ``ACTOR_BATCH``);
2. apply each command to the in-memory state, in order, collecting write
   operations and *effects* (replies and fan-outs). A refused command
   changes nothing and gets its error as an effect;
3. ``await store.write(ops)``: one durable write for the whole batch (and the
   store merges concurrent actors' batches into one transaction);
4. run the effects: acks go out only now, after the data is durable, and
   events fan out in seq order.

So seqs are assigned by exactly one task, start at 1 and have no gaps; a
retried Send (same sender and cmid within ``DEDUP_WINDOW`` messages) gets
the original seq; and nothing is acknowledged before it is on disk.

If anything raises between 1 and 4, the actor's memory may be ahead of the
store: the supervisor (``run``) answers the batch's commands with
``internal`` (none of them was acknowledged, so clients retry safely),
reloads the state from the store and continues with the mailbox intact.
After ``ACTOR_IDLE_S`` with an empty mailbox the actor is passivated by the
shard's sweep: it leaves the shard's table and its wait is cancelled in the
same step as the mailbox is checked empty (no checkpoint in between), so a
command is never stranded.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, cast

import trio
from msgspec.structs import replace

from protocol import (
    USER_BODY_TYPES,
    Conversation,
    ConversationEvent,
    ConversationInfo,
    ConvKind,
    ConvState,
    Delivered,
    Error,
    ErrorCode,
    GetConversation,
    MemberRole,
    Message,
    MessageEvent,
    Ok,
    OpenConversation,
    Read,
    Recall,
    RecallBody,
    ReceiptEvent,
    ReceiptKind,
    Role,
    Sent,
    ServerFrameType,
    SystemBody,
    Topic,
    Typing,
    TypingEvent,
    WorkerEvent,
    WorkerEventKind,
)

from .. import policy
from ..limits import (
    ACTOR_BATCH,
    ACTOR_IDLE_S,
    ACTOR_RESTARTS,
    APPLIED_KEYS_WINDOW,
    DEDUP_WINDOW,
    MAX_GROUP_MEMBERS,
    MAX_OPEN_CONVERSATIONS_PER_CUSTOMER,
    MAX_TAGS,
    RECALL_WINDOW_MS,
)
from ..logs import event, now_ms
from ..metrics import METRICS
from ..store import (
    MarkRecalled,
    PutAppliedKey,
    PutConversation,
    PutEvent,
    PutMessage,
    SetMembers,
    SetReadPoint,
    Store,
    WriteOp,
)
from ._commands import (
    AnyCommand,
    CreateGroupCmd,
    DeliveredCmd,
    GetCmd,
    MembersCmd,
    OpenDirectCmd,
    ReadCmd,
    RecallCmd,
    SendCmd,
    TypingCmd,
    UpdateCmd,
)

if TYPE_CHECKING:
    from ..dispatch import WorkerDispatcher
    from ..fanout import Hub

log = logging.getLogger("imserver.actor")

Effect = Callable[[], object]


class Refusal(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def customer_view(conv: Conversation) -> Conversation:
    """What a customer may see of a conversation: no internal tags or priority."""
    return replace(conv, tags=[], priority=0)


class ConversationActor:
    def __init__(
        self,
        conv_id: str,
        *,
        store: Store,
        hub: Hub,
        on_passivate: Callable[[ConversationActor, bool], bool],
        on_processed: Callable[[int], None] = lambda count: None,
        mailbox_depth: int,
        dispatcher: WorkerDispatcher,
        shard: int,
    ) -> None:
        self.conv_id = conv_id
        self.dispatcher = dispatcher
        self.shard = shard
        self.store = store
        self.hub = hub
        self._on_passivate = on_passivate
        self._on_processed = on_processed
        self.send_channel, self._receive_channel = trio.open_memory_channel[AnyCommand](
            mailbox_depth
        )
        self.conversation: Conversation | None = None
        self.members: dict[str, MemberRole] = {}
        self.recent: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        self.applied_keys: OrderedDict[str, None] = OrderedDict()
        self.read_points: dict[str, int] = {}
        self._batch: list[AnyCommand] = []
        self._read_ops: dict[str, SetReadPoint] = {}
        self._scope = trio.CancelScope()
        self.waiting = False
        self.idle_since = 0.0
        self._handlers: dict[type, Callable[..., object]] = {
            SendCmd: self._send,
            RecallCmd: self._recall,
            ReadCmd: self._read,
            DeliveredCmd: self._delivered,
            TypingCmd: self._typing,
            GetCmd: self._get,
            OpenDirectCmd: self._open_direct,
            CreateGroupCmd: self._create_group,
            MembersCmd: self._members,
            UpdateCmd: self._update,
        }

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Supervise the actor loop: restart on crash, fail the batch in flight."""
        with self._scope:
            await self._supervise()

    async def _supervise(self) -> None:
        crashes = 0
        while True:
            try:
                await self._load()
                await self._serve()
                return
            except Exception as exc:
                crashes += 1
                METRICS.actor_crashes.inc()
                event(
                    log,
                    "actor_crashed",
                    level=logging.ERROR,
                    conv=self.conv_id,
                    crashes=crashes,
                    error=repr(exc),
                )
                for cmd in self._batch:
                    self._reply_error(cmd, ErrorCode.INTERNAL, "internal error; retry")
                self._on_processed(len(self._batch))
                self._batch = []
                if crashes > ACTOR_RESTARTS:
                    self._give_up()
                    return

    def _give_up(self) -> None:
        self._on_passivate(self, True)  # leave the table first: new commands get a fresh actor
        while True:
            try:
                cmd = self._receive_channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            self._reply_error(cmd, ErrorCode.INTERNAL, "conversation unavailable; retry")
            self._on_processed(1)

    async def _load(self) -> None:
        snap = await self.store.load_actor(
            self.conv_id, dedup_window=DEDUP_WINDOW, keys_window=APPLIED_KEYS_WINDOW
        )
        self.conversation = snap.conversation
        self.members = dict(snap.members)
        self.recent = OrderedDict(snap.recent_cmids)
        self.applied_keys = OrderedDict.fromkeys(snap.applied_keys)
        self.read_points = {}

    def try_passivate(self, now: float) -> bool:
        """Called by the shard's sweep: stop if idle for ``ACTOR_IDLE_S`` with an
        empty mailbox. Synchronous, so no command can arrive in between."""
        if not self.waiting or now - self.idle_since < ACTOR_IDLE_S:
            return False
        if not self._on_passivate(self, False):
            return False
        self._scope.cancel()  # interrupts the (empty) receive; nothing is lost
        return True

    async def _serve(self) -> None:
        receive = self._receive_channel
        while True:
            # No timer per wait: idle actors are found by the shard's sweep.
            self.idle_since = trio.current_time()
            self.waiting = True
            try:
                first = await receive.receive()
            finally:
                self.waiting = False
            batch = [first]
            while len(batch) < ACTOR_BATCH:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            self._batch = batch
            await self._process(batch)
            self._batch = []
            self._on_processed(len(batch))

    async def _process(self, batch: Sequence[AnyCommand]) -> None:
        self._read_ops = {}
        ops: list[WriteOp] = []
        effects: list[Effect] = []
        for cmd in batch:
            try:
                result = self._handlers[type(cmd)](cmd, ops, effects)
                if result is not None:  # the async handlers' coroutines; sync ones return None
                    await cast(Awaitable[None], result)
            except Refusal as refusal:
                effects.append(_bind(self._reply_error, cmd, refusal.code, refusal.message))
        if ops:
            await self.store.write(ops)
        for effect in effects:
            effect()

    # ------------------------------------------------------------- helpers

    def _reply(self, cmd: AnyCommand, frame: ServerFrameType) -> None:
        if cmd.reply is not None:
            self.hub.reply(cmd.reply, frame)

    def _reply_error(self, cmd: AnyCommand, code: ErrorCode, message: str) -> None:
        if cmd.reply is not None:
            METRICS.errors.labels(code=code.value).inc()
            self.hub.reply(cmd.reply, Error(code=code, message=message, id=cmd.reply.request))

    def _existing(self, cmd: AnyCommand, kind: type | None = None) -> Conversation:
        """The conversation, if ``cmd.who`` may read it and (``kind``) make this
        request about it: the authorization table (``policy``) decides."""
        conv = self.conversation
        if conv is None or not policy.can_read(cmd.who, conv, self.members):
            # The same answer for "absent" and "not yours": ids are not an oracle.
            raise Refusal(ErrorCode.NOT_FOUND, f"no conversation {cmd.conv!r}")
        if kind is not None and not policy.conversation_access(kind, cmd.who, conv, self.members):
            raise Refusal(ErrorCode.FORBIDDEN, f"a {cmd.who.role} may not {kind.__name__} here")
        return conv

    def _publish_conversation(
        self, ops: list[WriteOp], conv: Conversation, change: str, *, also: str = ""
    ) -> Effect:
        """Tell participants (customer without internal fields), the shop's
        conversation watchers and the worker plugins what changed; ``also`` is a
        user who just left (a previous agent) and must hear it too."""
        members = self.members  # never mutated in place: see _members
        staff_frame = ConversationEvent(conversation=conv, change=change)
        logged = self._log_event(ops, WorkerEventKind.CONVERSATION, conv, change=change)

        def effect() -> None:
            if logged is not None:
                self.dispatcher.publish(logged.stored())
            self.hub.publish(
                conv,
                members,
                staff_frame,
                topic=Topic.CONVERSATIONS,
                exclude_user=conv.customer or "",
            )
            if conv.customer:
                self.hub.send_to_user(
                    conv.customer,
                    ConversationEvent(conversation=customer_view(conv), change=change),
                )
            if also and also != conv.agent:
                self.hub.send_to_user(also, staff_frame)

        return effect

    def _append(
        self,
        ops: list[WriteOp],
        effects: list[Effect],
        who: policy.Identity,
        cmid: str,
        body: object,
        *,
        exclude_session: str = "",
    ) -> Message:
        """Give a message the next seq, queue its write and its fan-out."""
        conv = self.conversation
        assert conv is not None
        seq = conv.last_seq + 1
        ts = max(now_ms(), conv.updated_at)
        message = Message(
            conv=conv.id,
            seq=seq,
            sender=who.user,
            sender_role=who.role,
            cmid=cmid,
            ts=ts,
            body=body,  # type: ignore[arg-type]
        )
        ops.append(PutMessage(message=message))
        self.conversation = conv = replace(conv, last_seq=seq, updated_at=ts)
        logged = self._log_event(ops, WorkerEventKind.MESSAGE, conv, message=message)
        if logged is not None:
            dispatch = self.dispatcher.publish
            effects.append(lambda: dispatch(logged.stored()))
        self._remember(who.user, cmid, seq, ts)
        members = self.members  # never mutated in place: see _members
        frame = MessageEvent(message=message)
        METRICS.hot.messages += 1
        effects.append(
            lambda: self.hub.publish(
                conv,
                members,
                frame,
                topic=Topic.MESSAGES,
                seq=seq,
                exclude_session=exclude_session,
            )
        )
        return message

    def _log_event(
        self,
        ops: list[WriteOp],
        kind: WorkerEventKind,
        conv: Conversation,
        *,
        message: Message | None = None,
        change: str = "",
    ) -> PutEvent | None:
        """Log a worker event in the same transaction as the change it describes
        (unless no plugin will ever want it)."""
        if not self.dispatcher.wants(kind):
            return None
        op = PutEvent(
            shard=self.shard,
            kind=kind,
            event=WorkerEvent(
                event_id=0,
                shard=self.shard,
                kind=kind,
                ts=message.ts if message else now_ms(),
                conversation=conv,
                message=message,
                change=change,
                shop=conv.shop,
            ),
        )
        ops.append(op)
        return op

    def _remember(self, user: str, cmid: str, seq: int, ts: int) -> None:
        self.recent[user, cmid] = (seq, ts)
        if len(self.recent) > DEDUP_WINDOW:
            self.recent.popitem(last=False)

    def _system(
        self,
        ops: list[WriteOp],
        effects: list[Effect],
        who: policy.Identity,
        name: str,
        **data: str,
    ) -> None:
        conv = self.conversation
        assert conv is not None
        cmid = f"sys:{name}:{conv.last_seq + 1}"
        self._append(ops, effects, who, cmid, SystemBody(event=name, data=data))

    def _raise_read_point(self, ops: list[WriteOp], user: str, seq: int) -> bool:
        if seq <= self.read_points.get(user, 0):
            return False
        self.read_points[user] = seq
        pending = self._read_ops.get(user)  # reset for every batch, so it is in ``ops``
        if pending is not None:
            pending.seq = seq  # one write per user per batch, however many messages
        else:
            op = SetReadPoint(conv=self.conv_id, user=user, seq=seq)
            self._read_ops[user] = op
            ops.append(op)
        return True

    # ------------------------------------------------------------ commands

    async def _is_agent_of(self, shop: str, user: str, who: policy.Identity) -> bool:
        """Whether ``user`` may be given a conversation of ``shop``: an agent or
        supervisor of it (the requester, by their token, or ``policy.is_agent_of_shop``:
        connected now, logged in there before, or with an agent status)."""
        if user == who.user and who.role in policy.ASSIGNEE_ROLES and who.shop == shop:
            return True
        return await policy.is_agent_of_shop(shop, user, online=self.hub, known=self.store)

    def _send(
        self, cmd: SendCmd, ops: list[WriteOp], effects: list[Effect]
    ) -> Awaitable[None] | None:
        conv = self._existing(cmd)
        who = cmd.who
        if not policy.can_send(who, conv, self.members):
            raise Refusal(ErrorCode.FORBIDDEN, "you may not send in this conversation")
        allowed = USER_BODY_TYPES + ((SystemBody,) if who.role in (Role.WORKER, Role.ADMIN) else ())
        if not isinstance(cmd.body, allowed):
            raise Refusal(ErrorCode.FORBIDDEN, f"{type(cmd.body).__name__} cannot be sent")
        original = self.recent.get((who.user, cmd.cmid))
        if original is not None:
            seq, ts = original
            effects.append(
                _bind(
                    self._reply,
                    cmd,
                    Sent(
                        id=cmd.reply.request if cmd.reply else 0,
                        conv=conv.id,
                        cmid=cmd.cmid,
                        seq=seq,
                        ts=ts,
                        duplicate=True,
                    ),
                )
            )
            return None
        if (
            conv.kind is ConvKind.DIRECT
            and conv.state is ConvState.CLOSED
            and who.role is Role.CUSTOMER
        ):
            return self._reopen_then_send(cmd, ops, effects)
        self._store_sent(cmd, ops, effects, conv)
        return None

    async def _reopen_then_send(
        self, cmd: SendCmd, ops: list[WriteOp], effects: list[Effect]
    ) -> None:
        """A customer writing into a closed conversation opens a new service
        session: within their cap on open conversations, as an open request."""
        cap = MAX_OPEN_CONVERSATIONS_PER_CUSTOMER
        if await self.store.count_open_direct(cmd.who.user, cap) >= cap:
            raise Refusal(
                ErrorCode.RATE_LIMITED,
                f"{cap} conversations are open already: wait for one to close",
            )
        conv = self.conversation
        assert conv is not None
        self.conversation = conv = replace(conv, state=ConvState.BOT, agent=None, priority=0)
        ops.append(PutConversation(conversation=conv))
        effects.append(self._publish_conversation(ops, conv, "reopened"))
        self._store_sent(cmd, ops, effects, conv)

    def _store_sent(
        self, cmd: SendCmd, ops: list[WriteOp], effects: list[Effect], conv: Conversation
    ) -> None:
        who = cmd.who
        message = self._append(ops, effects, who, cmd.cmid, cmd.body, exclude_session=who.session)
        self._raise_read_point(ops, who.user, message.seq)
        effects.append(
            _bind(
                self._reply,
                cmd,
                Sent(
                    id=cmd.reply.request if cmd.reply else 0,
                    conv=conv.id,
                    cmid=cmd.cmid,
                    seq=message.seq,
                    ts=message.ts,
                ),
            )
        )

    async def _recall(self, cmd: RecallCmd, ops: list[WriteOp], effects: list[Effect]) -> None:
        conv = self._existing(cmd, Recall)
        request_id = cmd.reply.request if cmd.reply else 0
        cmid = f"recall:{cmd.seq}"
        original = self.recent.get((cmd.who.user, cmid))
        if original is not None:
            effects.append(
                _bind(
                    self._reply,
                    cmd,
                    Sent(
                        id=request_id,
                        conv=conv.id,
                        cmid=cmid,
                        seq=original[0],
                        ts=original[1],
                        duplicate=True,
                    ),
                )
            )
            return
        target = next(
            (op.message for op in ops if isinstance(op, PutMessage) and op.message.seq == cmd.seq),
            None,
        )
        if target is None and 0 < cmd.seq <= conv.last_seq:
            found, _ = await self.store.history(
                conv.id, before=cmd.seq + 1, after=cmd.seq - 1, limit=1
            )
            target = found[0] if found else None
        if target is None:
            raise Refusal(ErrorCode.NOT_FOUND, f"no message {cmd.seq}")
        if target.sender != cmd.who.user:
            raise Refusal(ErrorCode.FORBIDDEN, "only the author may recall a message")
        if target.recalled or isinstance(target.body, RecallBody | SystemBody):
            raise Refusal(ErrorCode.CONFLICT, "message already recalled or not recallable")
        if now_ms() - target.ts > RECALL_WINDOW_MS:
            raise Refusal(ErrorCode.CONFLICT, "the recall window has passed")
        message = self._append(
            ops, effects, cmd.who, cmid, RecallBody(seq=cmd.seq), exclude_session=cmd.who.session
        )
        ops.append(MarkRecalled(conv=conv.id, seq=cmd.seq))
        effects.append(
            _bind(
                self._reply,
                cmd,
                Sent(
                    id=request_id,
                    conv=conv.id,
                    cmid=cmid,
                    seq=message.seq,
                    ts=message.ts,
                ),
            )
        )

    def _read(self, cmd: ReadCmd, ops: list[WriteOp], effects: list[Effect]) -> None:
        conv = self._existing(cmd, Read)
        seq = min(cmd.seq, conv.last_seq)
        if self._raise_read_point(ops, cmd.who.user, seq):
            members = self.members  # never mutated in place: see _members
            frame = ReceiptEvent(conv=conv.id, user=cmd.who.user, kind=ReceiptKind.READ, seq=seq)
            effects.append(
                lambda: self.hub.publish(
                    conv, members, frame, topic=Topic.MESSAGES, exclude_session=cmd.who.session
                )
            )
        effects.append(_bind(self._reply, cmd, Ok(id=cmd.reply.request if cmd.reply else 0)))

    def _delivered(self, cmd: DeliveredCmd, ops: list[WriteOp], effects: list[Effect]) -> None:
        conv = self._existing(cmd, Delivered)
        frame = ReceiptEvent(
            conv=conv.id,
            user=cmd.who.user,
            kind=ReceiptKind.DELIVERED,
            seq=min(cmd.seq, conv.last_seq),
        )
        members = self.members  # never mutated in place: see _members
        effects.append(
            lambda: self.hub.publish(
                conv, members, frame, topic=Topic.MESSAGES, exclude_user=cmd.who.user
            )
        )

    def _typing(self, cmd: TypingCmd, ops: list[WriteOp], effects: list[Effect]) -> None:
        conv = self._existing(cmd, Typing)
        frame = TypingEvent(conv=conv.id, user=cmd.who.user)
        members = self.members  # never mutated in place: see _members
        # Typing reaches participants only (not topic watchers): it is ephemeral chatter.
        effects.append(
            lambda: self.hub.publish(
                conv,
                members,
                frame,
                topic=None,
                exclude_user=cmd.who.user,
            )
        )

    async def _get(self, cmd: GetCmd, ops: list[WriteOp], effects: list[Effect]) -> None:
        conv = self._existing(cmd, GetConversation)
        read_seq = await self._read_point(cmd.who.user)
        effects.append(_bind(self._reply, cmd, self._info(cmd, conv, read_seq)))

    async def _read_point(self, user: str) -> int:
        read_seq = self.read_points.get(user)
        if read_seq is None:
            read_seq = await self.store.read_point(self.conv_id, user)
            self.read_points[user] = read_seq
        return read_seq

    def _info(self, cmd: AnyCommand, conv: Conversation, read_seq: int) -> ConversationInfo:
        view = customer_view(conv) if cmd.who.role is Role.CUSTOMER else conv
        view = replace(view, read_seq=read_seq, unread=max(0, conv.last_seq - read_seq))
        return ConversationInfo(id=cmd.reply.request if cmd.reply else 0, conversation=view)

    async def _open_direct(
        self, cmd: OpenDirectCmd, ops: list[WriteOp], effects: list[Effect]
    ) -> None:
        who = cmd.who
        if not policy.shop_access(OpenConversation, who, cmd.shop):
            raise Refusal(ErrorCode.FORBIDDEN, "only customers open direct conversations")
        conv = self.conversation
        now = now_ms()
        change = ""
        if conv is None:
            conv = Conversation(
                id=self.conv_id,
                kind=ConvKind.DIRECT,
                shop=cmd.shop,
                state=ConvState.BOT,
                channel=cmd.channel,
                customer=who.user,
                created_at=now,
                updated_at=now,
            )
            change = "opened"
        elif conv.customer != who.user or conv.shop != cmd.shop:
            raise Refusal(ErrorCode.FORBIDDEN, "conversation id collision")
        elif conv.state is ConvState.CLOSED:
            conv = replace(
                conv,
                state=ConvState.BOT,
                agent=None,
                priority=0,
                channel=cmd.channel,
                updated_at=max(now, conv.updated_at),
            )
            change = "reopened"
        elif conv.channel != cmd.channel:
            conv = replace(conv, channel=cmd.channel)
            change = "updated"
        if change:
            self.conversation = conv
            ops.append(PutConversation(conversation=conv))
            effects.append(self._publish_conversation(ops, conv, change))
        read_seq = 0 if change == "opened" else await self._read_point(who.user)
        effects.append(_bind(self._reply, cmd, self._info(cmd, conv, read_seq)))

    async def _check_members(self, who: policy.Identity, shop: str, users: list[str]) -> None:
        strangers = await policy.member_strangers(
            who, shop, users, online=self.hub, known=self.store
        )
        if strangers:
            raise Refusal(
                ErrorCode.FORBIDDEN,
                f"not users of shop {shop!r}: {', '.join(strangers)[:200]}",
            )

    async def _create_group(
        self, cmd: CreateGroupCmd, ops: list[WriteOp], effects: list[Effect]
    ) -> None:
        if self.conversation is not None:
            raise Refusal(ErrorCode.CONFLICT, "conversation exists")
        if not policy.can_create_group(cmd.who, cmd.shop):
            raise Refusal(ErrorCode.FORBIDDEN, "only staff of the shop create groups")
        members = {user: MemberRole.MEMBER for user in cmd.members}
        members[cmd.who.user] = MemberRole.OWNER
        if len(members) > MAX_GROUP_MEMBERS:
            raise Refusal(ErrorCode.TOO_LARGE, f"more than {MAX_GROUP_MEMBERS} members")
        await self._check_members(cmd.who, cmd.shop, list(members))
        now = now_ms()
        conv = Conversation(
            id=self.conv_id,
            kind=ConvKind.GROUP,
            shop=cmd.shop,
            state=ConvState.ASSIGNED,
            title=cmd.title,
            created_at=now,
            updated_at=now,
        )
        self.conversation = conv
        self.members = members
        ops.append(PutConversation(conversation=conv))
        ops.append(SetMembers(conv=conv.id, add=members))
        effects.append(self._publish_conversation(ops, conv, "created"))
        effects.append(_bind(self._reply, cmd, self._info(cmd, conv, 0)))

    async def _members(self, cmd: MembersCmd, ops: list[WriteOp], effects: list[Effect]) -> None:
        conv = self._existing(cmd)
        if not policy.can_manage_members(cmd.who, conv, self.members):
            raise Refusal(ErrorCode.FORBIDDEN, "you may not change this group's members")
        add = {u: cmd.role for u in cmd.add if self.members.get(u) != cmd.role}
        await self._check_members(cmd.who, conv.shop, [u for u in add if u not in self.members])
        remove = [
            u for u in cmd.remove if u in self.members and self.members[u] is not MemberRole.OWNER
        ]
        if len(set(self.members) | set(add)) - len(remove) > MAX_GROUP_MEMBERS:
            raise Refusal(ErrorCode.TOO_LARGE, f"more than {MAX_GROUP_MEMBERS} members")
        if add or remove:
            ops.append(SetMembers(conv=conv.id, add=add, remove=remove))
            # Copy on write: effects queued earlier keep the membership they saw.
            before = self.members
            updated = {**before, **add}
            for user in remove:
                updated.pop(user, None)
            self.members = updated
            self._system(
                ops,
                effects,
                cmd.who,
                "members",
                added=",".join(add)[:256],
                removed=",".join(remove)[:256],
            )
            current = self.conversation
            assert current is not None
            frame = ConversationEvent(conversation=current, change="members")
            audience = {**before, **self.members}
            effects.append(
                lambda: self.hub.publish(current, audience, frame, topic=Topic.CONVERSATIONS)
            )
        effects.append(_bind(self._reply, cmd, Ok(id=cmd.reply.request if cmd.reply else 0)))

    async def _update(self, cmd: UpdateCmd, ops: list[WriteOp], effects: list[Effect]) -> None:
        conv = self._existing(cmd)
        ok = Ok(id=cmd.reply.request if cmd.reply else 0)
        if cmd.key and cmd.key in self.applied_keys:
            effects.append(_bind(self._reply, cmd, ok))
            return
        if (cmd.if_state is not None and conv.state is not cmd.if_state) or (
            cmd.if_agent is not None and conv.agent != cmd.if_agent
        ):
            # A conditional update (routing): the conversation moved on meanwhile.
            raise Refusal(
                ErrorCode.CONFLICT,
                f"conversation is {conv.state}" + (f" with {conv.agent}" if conv.agent else ""),
            )
        state = cmd.state
        if cmd.agent is not None and state is None:
            state = ConvState.ASSIGNED
        reason = policy.check_update(cmd.who, conv, state, cmd.agent, self.members)
        if reason is not None:
            raise Refusal(ErrorCode.FORBIDDEN, reason)
        agent = conv.agent
        if state is ConvState.ASSIGNED:
            agent = cmd.agent or conv.agent
            if agent is None:
                raise Refusal(ErrorCode.BAD_FRAME, "assigning needs an agent")
            if agent != conv.agent and not await self._is_agent_of(conv.shop, agent, cmd.who):
                raise Refusal(
                    ErrorCode.FORBIDDEN, f"{agent!r} is not an agent of shop {conv.shop!r}"
                )
        elif state is not None:
            agent = None
        tags = [t for t in conv.tags if t not in cmd.tags_remove]
        tags += [t for t in dict.fromkeys(cmd.tags_add) if t not in tags]
        if len(tags) > MAX_TAGS:
            raise Refusal(ErrorCode.TOO_LARGE, f"more than {MAX_TAGS} tags")
        new = replace(
            conv,
            state=state or conv.state,
            agent=agent,
            priority=conv.priority if cmd.priority is None else cmd.priority,
            tags=tags,
            updated_at=max(now_ms(), conv.updated_at),
        )
        change = _change_name(conv, new)
        self.conversation = new
        ops.append(PutConversation(conversation=new))
        if cmd.key:
            self.applied_keys[cmd.key] = None
            if len(self.applied_keys) > APPLIED_KEYS_WINDOW:
                self.applied_keys.popitem(last=False)
            ops.append(PutAppliedKey(conv=conv.id, key=cmd.key, ts=new.updated_at))
        if change in ("assigned", "transferred", "queued", "closed", "reopened"):
            data = {"state": new.state.value}
            if new.agent:
                data["agent"] = new.agent
            if change == "transferred" and conv.agent:
                data["from"] = conv.agent
            self._system(ops, effects, cmd.who, change, **data)
        effects.append(
            self._publish_conversation(ops, self.conversation, change, also=conv.agent or "")
        )
        if cmd.note and new.agent:
            # The note is for staff: it goes to the receiving agent, never into the stream.
            note_event = ConversationEvent(
                conversation=self.conversation, change=change, note=cmd.note, by=cmd.who.user
            )
            target = new.agent
            effects.append(lambda: self.hub.send_to_user(target, note_event))
        effects.append(_bind(self._reply, cmd, ok))


def _change_name(old: Conversation, new: Conversation) -> str:
    if new.state is not old.state:
        if new.state is ConvState.ASSIGNED:
            return "assigned"
        if old.state is ConvState.CLOSED:
            return "reopened"
        return new.state.value  # queued, closed, bot
    if new.state is ConvState.ASSIGNED and new.agent != old.agent:
        return "transferred"
    return "updated"


def _bind(fn: Callable[..., object], *args: object) -> Effect:
    return lambda: fn(*args)
