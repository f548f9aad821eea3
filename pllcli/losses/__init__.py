"""Loss functions: partial-label losses (`pll`), semi-supervised (`semi`), multiple-instance (`mil`).

All losses are plain functions on tensors; the trainer wraps them in objectives
(`pllcli.training.objectives`).
"""
