"""The training layer, above every other: the shared training loop, each family's trainer, transfer fine-tuning,
sampling, fault tolerance and distribution, recipes and the CNN trainers' command line. Nothing below imports it."""
