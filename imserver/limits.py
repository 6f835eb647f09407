"""Every bound the server enforces, in one place.

Wire limits (the ones a client sees, announced in ``Welcome.limits``) come from
the protocol package and are re-exported here; the rest are internal: queue
and mailbox depths, buffer sizes, timers. The README's limits table is made
from this module; change a number here and nowhere else.
"""

from typing import Final

from protocol._limits import (
    FRAMES_BURST,
    FRAMES_PER_SECOND,
    HEARTBEAT_INTERVAL_MS,
    IDLE_TIMEOUT_MS,
    MAX_BATCH_IDS,
    MAX_CONVERSATION_PAGE,
    MAX_FRAME_BYTES,
    MAX_GROUP_MEMBERS,
    MAX_HISTORY_PAGE,
    MAX_ID_CHARS,
    MAX_INFLIGHT_REQUESTS,
    MAX_RESUME_POINTS,
    MAX_TAGS,
    MAX_TEXT_CHARS,
    MAX_TOKEN_CHARS,
    RECALL_WINDOW_MS,
    WORKER_FRAMES_BURST,
    WORKER_FRAMES_PER_SECOND,
)

# ---------------------------------------------------------------- gateway

MAX_CONNECTIONS: Final = 50_000
"""Open WebSocket connections per process; beyond it new ones get HTTP 503."""

HANDSHAKE_TIMEOUT_S: Final = 10.0
"""From TCP accept to a valid Hello (HTTP upgrade included); slowloris guard."""

MAX_HTTP_REQUEST_BYTES: Final = 16 * 1024
"""Largest HTTP upgrade request head we buffer."""

OUTBOUND_BUFFER_BYTES: Final = 1024 * 1024
"""Bytes queued for one connection and not yet written to its socket. Past it
the connection is a slow consumer: closed with 4008 (it resumes losslessly)."""

OUTBOUND_BUFFER_FRAMES: Final = 4096
"""Frames queued for one connection; the same policy as the byte bound."""

SEND_TIMEOUT_S: Final = 10.0
"""One socket write that takes longer marks the peer as stalled (closed, 4008)."""

RECEIVE_CHUNK_BYTES: Final = 64 * 1024
"""Read size from the socket."""

DRAIN_TIMEOUT_S: Final = 10.0
"""On SIGTERM: time given to in-flight requests and the store flush."""

MAX_WATCHED_USERS: Final = 1000
"""Presence subscriptions one connection may hold."""

MAX_DEVICES_PER_USER: Final = 20
"""Concurrent connections of one user (all devices); the oldest is closed with 4010."""

RESUME_BATCH: Final = 500
"""Messages read from the store per query while replaying a resume."""

MAX_RESUME_MESSAGES: Final = 10_000
"""Most messages replayed per conversation on resume; past it the client pages History."""

TOKEN_REPLAY_CACHE: Final = 200_000
"""Single-use token ids remembered (until their expiry) to refuse replays."""

MAX_TOKEN_TTL_S: Final = 30 * 24 * 3600
"""Tokens claiming a longer life are refused."""

# ------------------------------------------------------ shards and actors

SHARD_COUNT: Final = 16
"""Shards of the conversation space (conversation id -> crc32 % SHARD_COUNT)."""

SHARD_QUEUE_DEPTH: Final = 4096
"""Commands waiting in one shard's queue; past it submitters get ``unavailable``."""

ACTOR_MAILBOX_DEPTH: Final = 1024
"""Commands waiting for one conversation actor; past it ``unavailable``."""

ACTOR_BATCH: Final = 256
"""Most commands an actor takes from its mailbox into one store commit."""

ACTOR_IDLE_S: Final = 120.0
"""An actor with nothing to do for this long is passivated (state stays in the store)."""

ACTOR_RESTARTS: Final = 5
"""Crashes in a row after which an actor gives up and fails its mailbox with ``internal``."""

DEDUP_WINDOW: Final = 10_000
"""Client message ids remembered per conversation: a retry of one of the last
DEDUP_WINDOW messages returns its original seq."""

APPLIED_KEYS_WINDOW: Final = 10_000
"""Idempotency keys of conversation updates remembered per conversation."""

# ------------------------------------------------------------------ store

STORE_MAX_BATCH_OPS: Final = 4096
"""Most write operations in one SQLite transaction (group commit)."""

STORE_MAX_PENDING_OPS: Final = 65_536
"""Write operations waiting for the committer; writers wait beyond it (backpressure)."""

STORE_READERS: Final = 2
"""Read-only SQLite connections (threads) serving history, lists and resume."""

RETENTION_DAYS: Final = 180
"""Messages older than this are deleted (``--retention-days`` overrides)."""

RETENTION_SWEEP_S: Final = 3600.0
"""How often the retention sweep runs."""

RETENTION_DELETE_BATCH: Final = 5000
"""Rows deleted per retention transaction, so the sweep never blocks commits long."""

__all__ = [name for name in dir() if name.isupper()]
_WIRE = (
    FRAMES_BURST, FRAMES_PER_SECOND, HEARTBEAT_INTERVAL_MS, IDLE_TIMEOUT_MS, MAX_BATCH_IDS,
    MAX_CONVERSATION_PAGE, MAX_FRAME_BYTES, MAX_GROUP_MEMBERS, MAX_HISTORY_PAGE, MAX_ID_CHARS,
    MAX_INFLIGHT_REQUESTS, MAX_RESUME_POINTS, MAX_TAGS, MAX_TEXT_CHARS, MAX_TOKEN_CHARS,
    RECALL_WINDOW_MS, WORKER_FRAMES_BURST, WORKER_FRAMES_PER_SECOND,
)
