"""The paper in miniature (`specialize demo`): the toy teacher and student (`toy_models`), the run
itself and its REPORT.md (`run`), and the findings judged by paired gaps (`findings`)."""
