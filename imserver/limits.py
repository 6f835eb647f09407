"""Every bound the server enforces, in one place.

Wire limits (the ones a client sees, announced in ``Welcome.limits``) come from
the protocol package and are re-exported here; the rest are internal: queue
and mailbox depths, buffer sizes, timers. The README's limits table is made
from this module; change a number here and nowhere else.
"""

from typing import Final

from protocol._limits import (  # re-exported: one table for every bound
    FRAMES_BURST as FRAMES_BURST,
)
from protocol._limits import (
    FRAMES_PER_SECOND as FRAMES_PER_SECOND,
)
from protocol._limits import (
    HEARTBEAT_INTERVAL_MS as HEARTBEAT_INTERVAL_MS,
)
from protocol._limits import (
    IDLE_TIMEOUT_MS as IDLE_TIMEOUT_MS,
)
from protocol._limits import (
    MAX_BATCH_IDS as MAX_BATCH_IDS,
)
from protocol._limits import (
    MAX_CONVERSATION_PAGE as MAX_CONVERSATION_PAGE,
)
from protocol._limits import (
    MAX_FRAME_BYTES as MAX_FRAME_BYTES,
)
from protocol._limits import (
    MAX_GROUP_MEMBERS as MAX_GROUP_MEMBERS,
)
from protocol._limits import (
    MAX_HISTORY_PAGE as MAX_HISTORY_PAGE,
)
from protocol._limits import (
    MAX_ID_CHARS as MAX_ID_CHARS,
)
from protocol._limits import (
    MAX_INFLIGHT_REQUESTS as MAX_INFLIGHT_REQUESTS,
)
from protocol._limits import (
    MAX_RESUME_POINTS as MAX_RESUME_POINTS,
)
from protocol._limits import (
    MAX_SERVER_FRAME_BYTES as MAX_SERVER_FRAME_BYTES,
)
from protocol._limits import (
    MAX_TAGS as MAX_TAGS,
)
from protocol._limits import (
    MAX_TEXT_CHARS as MAX_TEXT_CHARS,
)
from protocol._limits import (
    MAX_TOKEN_CHARS as MAX_TOKEN_CHARS,
)
from protocol._limits import (
    RECALL_WINDOW_MS as RECALL_WINDOW_MS,
)
from protocol._limits import (
    WORKER_FRAMES_BURST as WORKER_FRAMES_BURST,
)
from protocol._limits import (
    WORKER_FRAMES_PER_SECOND as WORKER_FRAMES_PER_SECOND,
)

# ---------------------------------------------------------------- gateway

MAX_CONNECTIONS: Final = 50_000
"""Open WebSocket connections per process; beyond it new ones get HTTP 503."""

HANDSHAKE_TIMEOUT_S: Final = 10.0
"""From TCP accept to a valid Hello (HTTP upgrade included); slowloris guard."""

MAX_HTTP_REQUEST_BYTES: Final = 16 * 1024
"""Largest HTTP upgrade request head we buffer."""

OUTBOUND_BUFFER_BYTES: Final = 1024 * 1024
"""Soft bound on bytes queued for one connection and not yet written to its
socket. A connection that stays above it for ``SLOW_CONSUMER_GRACE_S`` is a
slow consumer: closed with 4008 (it resumes losslessly). Bursts (a batch of
large messages) may pass it briefly."""

OUTBOUND_BUFFER_HARD_BYTES: Final = 8 * 1024 * 1024
"""Hard bound: reaching it closes the connection (4008) at once."""

OUTBOUND_BUFFER_FRAMES: Final = 65_536
"""Hard bound on frames queued for one connection; the same policy."""

SLOW_CONSUMER_GRACE_S: Final = 5.0
"""How long a connection may stay above ``OUTBOUND_BUFFER_BYTES``."""

SEND_TIMEOUT_S: Final = 10.0
"""One socket write that takes longer marks the peer as stalled (closed, 4008)."""

RECEIVE_CHUNK_BYTES: Final = 64 * 1024
"""Read size from the socket."""

READ_MUX_EVENTS_PER_ROUND: Final = 1024
"""Ready connections the read multiplexer serves per round before other tasks
run (the rest come again next round: it is level-triggered)."""

SESSION_SWEEP_S: Final = 1.0
"""How often one task checks every connection's deadlines (Hello, idle, stuck writes)."""

DRAIN_TIMEOUT_S: Final = 10.0
"""On SIGTERM: time given to in-flight requests and the store flush."""

MAX_WATCHED_USERS: Final = 1000
"""Presence subscriptions one connection may hold."""

MAX_AGENT_LIST: Final = 5000
"""Most agents one ``ListAgents`` reply names (by id; ``truncated`` says there were more)."""

MAX_DEVICES_PER_USER: Final = 20
"""Concurrent connections of one user (all devices); the oldest is closed with 4010."""

MAX_OPEN_CONVERSATIONS_PER_CUSTOMER: Final = 50
"""Direct conversations one customer may have open (not closed) at once, over all
shops; opening one more is ``rate_limited``. Concurrent opens may pass it by at
most ``CUSTOMER_OPENS_BURST``."""

CUSTOMER_OPENS_PER_MINUTE: Final = 30
"""Sustained rate of OpenConversation requests per customer (all devices; token
bucket); faster ones are ``rate_limited`` with a retry hint."""

CUSTOMER_OPENS_BURST: Final = 30
"""Token bucket depth for a customer's opens."""

CUSTOMER_OPEN_BUCKETS: Final = 100_000
"""Customers whose open rate is remembered (the least recently active are
forgotten first: they start again with a full bucket)."""

RESUME_BATCH: Final = 500
"""Messages read from the store per query while replaying a resume."""

CATCHUP_BUFFER: Final = 1000
"""Live events buffered per conversation while its resume replay runs; past it the
session re-reads the store instead (never drops)."""

CLOSE_SEND_TIMEOUT_S: Final = 2.0
"""After the server closes a connection, how long its close frame (and what was
queued before it) may take to be written; a peer that does not read by then is
dropped at once."""

CLOSE_LINGER_S: Final = 2.0
"""After our close frame is written, how long we read on for the peer's before
dropping TCP. A peer that never answers, never reads and never sends FIN holds
its socket at most ``CLOSE_SEND_TIMEOUT_S + CLOSE_LINGER_S`` after the close."""

ACCEPT_BACKOFF_S: Final = 0.05
"""First pause of the accept loop after ``accept`` fails for lack of descriptors or
kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM); it doubles per failure up to
``ACCEPT_BACKOFF_MAX_S``. Open connections are served meanwhile, and one spare
descriptor answers the connections waiting in the backlog, one at a time:
``/healthz`` and ``/metrics`` work, upgrades are refused with 503."""

ACCEPT_BACKOFF_MAX_S: Final = 1.0
"""Longest pause of the accept loop while descriptors are exhausted; also the
longest a connection may hold the spare descriptor."""

OVERLOAD_RETRY_MS: Final = 200
"""Retry hint sent with ``unavailable`` while the server stops."""

TOKEN_REPLAY_CACHE: Final = 200_000
"""Single-use token ids remembered (until their expiry) to refuse replays."""

MAX_TOKEN_TTL_S: Final = 30 * 24 * 3600
"""Tokens claiming a longer life are refused."""

TOKEN_CLOCK_SKEW_S: Final = 300
"""How far in the future a token's ``iat`` (or ``nbf``) may lie: the issuer's
clock may run a little ahead of ours. Further is refused."""

MIN_SECRET_BYTES: Final = 32
"""Shortest server signing secret: HS256 wants a key of at least 256 bits
(RFC 7518, section 3.2)."""

JWKS_RECHECK_S: Final = 1.0
"""How often the shops' JWKS files (and the directory holding them) are checked
for changes: an added, rotated or withdrawn shop key takes effect within it."""

MAX_JWKS_BYTES: Final = 65_536
"""Largest JWKS file read; a larger one is refused (its shop then has no keys)."""

MAX_JWKS_KEYS: Final = 16
"""Most keys in one shop's JWKS (rotation needs two or three)."""

JWKS_URL_REFRESH_S: Final = 300.0
"""How often a shop's JWKS URL is fetched again (sooner when a token names a
kid it does not hold yet)."""

JWKS_URL_COOLDOWN_S: Final = 10.0
"""Least time between two fetches of the JWKS URLs: tokens with unknown kids
cannot make us hammer a shop's endpoint."""

JWKS_FETCH_TIMEOUT_S: Final = 10.0
"""One JWKS URL fetch gives up after this long (the shop keeps its last keys)."""

GC_THRESHOLDS: Final = (50_000, 20, 1000)
"""Python's cyclic collector thresholds (gen0 allocations, gen1, gen2 counts) for
the server process. A full (gen-2) collection stops the server for 100-330 ms
under load (measured at 18,000 msg/s); with a gen-2 threshold of 100 one came
every minute or so, with 1000 every ten or more. Cyclic garbage that reaches
gen 2 (ended sessions) waits that long to be freed: some MiB after a storm."""

# ------------------------------------------------------ shards and actors

SHARD_COUNT: Final = 16
"""Shards of the conversation space (conversation id -> crc32 % SHARD_COUNT)."""

SHARD_QUEUE_DEPTH: Final = 4096
"""Commands waiting in one shard's queue; past it the submitting connection waits
(its socket is not read meanwhile: backpressure on that client only)."""

ACTOR_MAILBOX_DEPTH: Final = 1024
"""Commands waiting for one conversation actor; past it the shard waits for room."""

ACTOR_BATCH: Final = 256
"""Most commands an actor takes from its mailbox into one store commit."""

ACTOR_IDLE_S: Final = 120.0
"""An actor with nothing to do for this long is passivated (state stays in the store)."""

ACTOR_RESTARTS: Final = 5
"""Crashes in a row after which an actor gives up and fails its mailbox with ``internal``."""

DEDUP_WINDOW: Final = 2_000
"""Client message ids remembered per conversation (in memory while its actor is
live, reloaded from the store on activation): a retry of one of the last
DEDUP_WINDOW messages returns its original seq."""

APPLIED_KEYS_WINDOW: Final = 2_000
"""Idempotency keys of conversation updates remembered per conversation."""

# ---------------------------------------------------------------- workers

WORKER_ACK_TIMEOUT_S: Final = 15.0
"""An event a worker has not acked after this long is delivered again."""

WORKER_CURSOR_SAVE_S: Final = 1.0
"""How often each plugin's acked watermark is saved (replay starts there after a restart)."""

WORKER_MAX_INFLIGHT: Final = 10_000
"""Unacked events held in memory per plugin; beyond it the plugin is fed from the log."""

WORKER_REPLAY_BATCH: Final = 500
"""Events read from the log per query when catching a plugin up."""

WORKER_HEARTBEAT_MS: Final = 2_000
"""Heartbeat interval announced to workers: a dead worker is noticed within seconds."""

WORKER_IDLE_TIMEOUT_MS: Final = 6_000
"""Idle timeout for worker connections; their shards move to the survivors after it."""

WORKER_EVENT_RETENTION_MS: Final = 3 * 86_400_000
"""Worker events older than this are pruned from the log (acked or not)."""

# ------------------------------------------------------------------ store

STORE_MAX_BATCH_OPS: Final = 4096
"""Most write operations in one SQLite transaction (group commit)."""

STORE_COMMIT_WINDOW_S: Final = 0.0
"""Group commit by time: a store transaction starts once its oldest write has
waited this long (at once when a full batch waits, or under load, when the
previous commit took longer). A durable commit costs about the same CPU for one
message as for fifty (an fsync, a round trip to the writer process), so a
window makes each commit carry more messages at low load (2 ms: about 10 %
less server CPU per message at 500-1,000 msg/s; 5 ms: about 30 %), but it also
adds itself to every commit an actor waits for: a client that sends one
message at a time into one conversation gets one message per window, not per
commit. Off by default (``serve`` commits at once)."""

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


def markdown_table() -> str:
    """The README's limits table, made from the docstrings in this module and the
    protocol's (``python -m imserver.limits``)."""
    import ast
    import importlib
    import inspect

    rows = []
    for module_name in ("protocol._limits", "imserver.limits"):
        module = importlib.import_module(module_name)
        tree = ast.parse(inspect.getsource(module))
        body = tree.body
        for node, after in zip(body, [*body[1:], None], strict=True):
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            doc = ""
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                doc = " ".join(str(after.value.value).split())
            value = getattr(module, node.target.id)
            shown = (
                f"{sorted(value)}"
                if isinstance(value, frozenset)
                else f"{value:,}"
                if isinstance(value, int)
                else str(value)
            )
            rows.append(f"| `{node.target.id}` | {shown} | {doc} |")
    return "\n".join(["| limit | value | meaning |", "|---|---|---|", *rows])


if __name__ == "__main__":
    print(markdown_table())
