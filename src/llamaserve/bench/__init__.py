"""Benchmarks: `llamaserve bench serve|report|throughput|latency`."""
