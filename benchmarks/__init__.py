"""Benchmarks that print numbers (not installed with the package); run each as ``python -m benchmarks.<name>``."""
