"""Per-service load tests (``banaserve loadtest SERVICE``; docs/loadtest.md).

``driver.py`` (when iterations start, bounds, samples), ``report.py`` (figures per RPC, JSON,
CSV, markdown), ``stubs.py`` (instant peers: a KV sink, stub workers), one scenario module per
service (``router``, ``prefill``, ``decode``, ``kvstore``) and ``cli.py`` (flags, steps, files).
"""
