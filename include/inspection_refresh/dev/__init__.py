"""Local stand-ins and sample data for the demo, the tests and the benchmarks (not used in production)."""
