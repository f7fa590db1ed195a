"""adasr profiles: latency per bit-width, quality per engine, reports and plots."""
