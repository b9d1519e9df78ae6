"""EAGLE-3 draft: head, checkpoints, chain drafter."""
