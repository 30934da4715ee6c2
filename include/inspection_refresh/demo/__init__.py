"""Synthetic demo data: product images with and without defects, for the demo, tests and benchmarks."""
