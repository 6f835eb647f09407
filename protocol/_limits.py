"""Wire limits: the hard bounds every peer can rely on.

These are the protocol's own numbers. The server announces the values it
enforces in ``Welcome.limits`` (a server may be stricter, never looser), and a
client must not exceed them. Server-side limits that are not visible on the
wire (mailboxes, queues, buffers) live in ``imserver.limits``, which re-exports
these so that one table documents everything.
"""

from typing import Final

PROTOCOL_VERSION: Final = 1
"""The version this package speaks. Hello carries it; a mismatch is refused."""

SUPPORTED_VERSIONS: Final = frozenset({1})
"""Versions a server of this package accepts in Hello."""

MAX_FRAME_BYTES: Final = 64 * 1024
"""Largest WebSocket message (one protocol frame) either side may send.
A larger one is answered with close code 1009 (message too big)."""

MAX_SERVER_FRAME_BYTES: Final = 1024 * 1024
"""Largest frame a server sends (history pages are cut to fit, with ``has_more``).
Clients must accept messages up to this size."""

MAX_TEXT_CHARS: Final = 5000
"""Longest text body, in characters (a long customer-service answer fits)."""

MAX_ID_CHARS: Final = 128
"""Longest identifier: user, shop, conversation, device, client message id."""

MAX_TOKEN_CHARS: Final = 2048
"""Longest auth token."""

MAX_RESUME_POINTS: Final = 1000
"""Most conversations a Hello may name in its resume map."""

MAX_HISTORY_PAGE: Final = 200
"""Most messages one History request returns."""

MAX_CONVERSATION_PAGE: Final = 200
"""Most conversations one ListConversations request returns."""

MAX_TAGS: Final = 32
"""Most tags on one conversation."""

MAX_GROUP_MEMBERS: Final = 5000
"""Most members of one shop group chat."""

MAX_BATCH_IDS: Final = 200
"""Most ids in one list-valued request field (presence watch, group members)."""

MAX_ATTRS: Final = 32
"""Most keys in a string map (system event data, card attributes)."""

RECALL_WINDOW_MS: Final = 2 * 60 * 1000
"""An author may recall their message within this long after it was stored."""

HEARTBEAT_INTERVAL_MS: Final = 20_000
"""A client sends at least one frame (a Ping will do) this often."""

IDLE_TIMEOUT_MS: Final = 60_000
"""A connection silent for this long is closed with 4009 (idle timeout)."""

FRAMES_PER_SECOND: Final = 50
"""Sustained inbound frame rate per connection for people (token bucket)."""

FRAMES_BURST: Final = 200
"""Token bucket depth for people: short bursts above the sustained rate."""

WORKER_FRAMES_PER_SECOND: Final = 5000
"""Sustained inbound rate for ``worker`` and ``admin`` connections (bots, routing, load tests)."""

WORKER_FRAMES_BURST: Final = 20000
"""Token bucket depth for ``worker`` and ``admin`` connections."""

MAX_INFLIGHT_REQUESTS: Final = 256
"""Requests a connection may have awaiting their reply; more is ``rate_limited``."""
