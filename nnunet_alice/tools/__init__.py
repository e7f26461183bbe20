"""Command-line tools that ship with nnunet_alice (demo data generation, benchmarks)."""
