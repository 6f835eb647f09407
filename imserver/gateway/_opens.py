"""The per-customer bound on the rate of OpenConversation requests.

One token bucket per customer, shared by all their devices on this process,
kept for the ``CUSTOMER_OPEN_BUCKETS`` most recently active customers (an LRU:
a forgotten customer starts again with a full bucket, which is never more
than the burst a new customer has anyway).
"""

from __future__ import annotations

from collections import OrderedDict

from protocol import TokenBucket

from ..limits import CUSTOMER_OPEN_BUCKETS, CUSTOMER_OPENS_BURST, CUSTOMER_OPENS_PER_MINUTE


class OpenRate:
    def __init__(
        self,
        *,
        per_minute: float = CUSTOMER_OPENS_PER_MINUTE,
        burst: float = CUSTOMER_OPENS_BURST,
        size: int = CUSTOMER_OPEN_BUCKETS,
    ) -> None:
        self._rate = per_minute / 60
        self._burst = burst
        self._size = size
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, customer: str, now: float) -> float:
        """0 if ``customer`` may open now, else the seconds until they may."""
        bucket = self._buckets.get(customer)
        if bucket is None:
            bucket = self._buckets[customer] = TokenBucket(self._rate, self._burst, now)
            if len(self._buckets) > self._size:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(customer)
        return bucket.take(now)
