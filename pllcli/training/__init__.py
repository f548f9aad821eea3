"""Training: the engine (`engine`: the one loop, with `checkpoints`, `distributed`, `schedules`,
`progress`) and its tasks: classifiers (`trainer.train`, `classify`), WHEN/WHO (`weak`) and
pretraining (`pllcli.pretrain`). Objectives (`objectives`), batching (`data`, `selection`),
augmentation (`augment`) and inference (`inference`) are shared by all of them."""
