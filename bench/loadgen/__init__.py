"""The native load generator: asyncio + uvloop, ``websockets`` client, imserver's protocol.

Modules: ``client`` (one protocol session), ``payload`` (stamped text),
``histogram`` (HdrHistogram), ``pool`` (forked load workers + coordinator),
``sysstat`` (server RSS/CPU from /proc), one module per scenario
(``peak_sale``, ``fanout``, ``reconnect_storm``, ``idle``, ``bot_heavy``) and
``suite`` (profiles and dispatch). ``python -m bench.loadgen`` runs one
scenario against a running server.
"""
