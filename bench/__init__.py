"""Every ChatStream benchmark, one module each (docs/benchmarks.md says how to run each and what it found).

Benchmarks share the private-server harness with the tests through ``chatstream_site.localservers`` and import
nothing from ``tests/``. Entry points: ``manage.py bench`` (fan-out, ``bench.fanout``) and
``python -m bench.<module>`` for the others.
"""
