"""specialize.benchmarks: throughput and memory benchmarks (each writes JSON and prints a table)."""
