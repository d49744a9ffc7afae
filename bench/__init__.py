"""Side-by-side load test of aml-auth-proxy against nginx: `make bench` (see docs/performance.md)."""
