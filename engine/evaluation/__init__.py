"""Evaluation of a run: generation and scoring (`evaluate`), the checkpoint-selection rule and
`specialize select` (`select`), and the figures (`plots`). Each module is imported on its own, so
loading one does not pull in matplotlib or the models."""
