"""Training: objectives (`objectives`), in-memory batching (`data`), augmentation (`augment`),
the trainer (`trainer.train`)."""
