"""specialize.engine: data, teacher, DeepSpeed trainer, evaluation and the `specialize` CLI."""
