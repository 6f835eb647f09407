"""Conversation ids minted by the gateway.

A customer has exactly one direct conversation with a shop, for ever: its
id is derived from (shop, customer), so concurrent OpenConversation calls
from several devices meet in the same actor instead of racing to create
two. "Closed" is a state of that conversation, not its end.
"""

import hashlib
import secrets


def direct_conversation_id(shop: str, customer: str) -> str:
    digest = hashlib.blake2b(f"{shop}\x00{customer}".encode(), digest_size=12).hexdigest()
    return f"d_{digest}"


def group_conversation_id() -> str:
    return f"g_{secrets.token_hex(12)}"
