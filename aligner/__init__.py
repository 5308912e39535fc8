"""specialize.aligner: align teacher top-k distributions onto student tokens."""
