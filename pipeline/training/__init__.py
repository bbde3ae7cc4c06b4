"""Training: losses, GradCache, the backward adapter, the trainer loop, checkpoints, export, the --check plan."""
