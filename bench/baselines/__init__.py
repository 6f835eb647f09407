"""Bare relays speaking imserver's protocol subset, used as performance baselines.

Both share the routing core in ``_hub``; they differ only in the I/O stack:
``trio_wsproto_relay`` (trio + wsproto, imserver's own stack) and ``ws_relay``
(asyncio + uvloop + websockets).
"""
