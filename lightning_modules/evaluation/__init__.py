"""Evaluation of aligned states: the leave-task-out evaluation, metrics and bootstrap intervals, the OOD
detectors and their selection, and the prediction writer of `xsilo predict`."""
