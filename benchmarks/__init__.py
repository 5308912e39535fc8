"""specialize.benchmarks: throughput and memory benchmarks (each writes JSON and prints a table)."""

import specialize.engine  # noqa: F401  (takes the checkout off sys.path before transformers loads)
