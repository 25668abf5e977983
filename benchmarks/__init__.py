"""Step throughput, MFU and memory benchmarks (see benchmarks/README.md)."""
