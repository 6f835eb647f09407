"""Benchmarks for imserver: bare relay baselines, a native load generator, a locustfile.

``python -m bench.run`` runs the standard suite against imserver and the
baselines; see bench/README.md.
"""
