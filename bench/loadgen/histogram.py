"""Latency histograms: HdrHistogram behind a small typed API that merges across processes.

Theory of operation
-------------------
Values are recorded in whole microseconds into an HdrHistogram (PyPI
``hdrhistogram``, log-bucketed with linear sub-buckets: every recorded value
is kept to ``SIGNIFICANT_DIGITS`` significant digits, i.e. within 0.1 %,
from ``LOWEST_US`` to ``HIGHEST_US``). Recording is O(1) and allocation-free,
so a load worker can record every message.

A value above ``HIGHEST_US`` is recorded as ``HIGHEST_US`` and counted in
``clamped``, so an overload never disappears from the tail; a negative value
(impossible with one monotonic clock, kept for safety) is recorded as 0.

Workers ship histograms to the coordinator as ``EncodedHistogram`` (the HDR
V2 compressed base64 form plus the clamp count), which it decodes and
``merge``s; percentiles of the merged histogram are exact to the bucket
precision, unlike averages of per-worker percentiles.
"""

from __future__ import annotations

from typing import Final

import msgspec
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LOWEST_US: Final = 1
HIGHEST_US: Final = 300_000_000
"""300 s: anything slower is clamped (and counted)."""
SIGNIFICANT_DIGITS: Final = 3
PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)


class EncodedHistogram(msgspec.Struct, frozen=True):
    hdr: str
    clamped: int = 0


class LatencySummary(msgspec.Struct, frozen=True):
    """Milliseconds. ``count`` 0 means no samples (the other fields are then 0)."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    clamped: int = 0


class LatencyHistogram:
    __slots__ = ("_h", "clamped")

    def __init__(self) -> None:
        self._h = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
        self.clamped = 0

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def record_ns(self, ns: int) -> None:
        us = ns // 1000
        if us > HIGHEST_US:
            us = HIGHEST_US
            self.clamped += 1
        elif us < 0:
            us = 0
        self._h.record_value(us)

    def merge(self, other: LatencyHistogram) -> None:
        self._h.add(other._h)
        self.clamped += other.clamped

    def encode(self) -> EncodedHistogram:
        hdr = self._h.encode()
        return EncodedHistogram(
            hdr=hdr.decode("ascii") if isinstance(hdr, bytes) else str(hdr), clamped=self.clamped
        )

    @classmethod
    def decode(cls, encoded: EncodedHistogram) -> LatencyHistogram:
        histogram = cls()
        if encoded.hdr:
            histogram._h.add(HdrHistogram.decode(encoded.hdr))
        histogram.clamped = encoded.clamped
        return histogram

    @classmethod
    def merged(cls, parts: list[EncodedHistogram]) -> LatencyHistogram:
        total = cls()
        for part in parts:
            total.merge(cls.decode(part))
        return total

    def percentile_ms(self, percentile: float) -> float:
        if self.count == 0:
            return 0.0
        return float(self._h.get_value_at_percentile(percentile)) / 1000.0

    def summary(self) -> LatencySummary:
        if self.count == 0:
            return LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
        p50, p90, p99, p999 = (round(self.percentile_ms(p), 3) for p in PERCENTILES)
        return LatencySummary(
            count=self.count,
            p50_ms=p50,
            p90_ms=p90,
            p99_ms=p99,
            p999_ms=p999,
            max_ms=round(float(self._h.get_max_value()) / 1000.0, 3),
            mean_ms=round(float(self._h.get_mean_value()) / 1000.0, 3),
            clamped=self.clamped,
        )
