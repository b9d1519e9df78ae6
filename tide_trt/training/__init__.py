"""Draft training: the training-time-test objective, draft vocabularies, offline (recompute) training."""
