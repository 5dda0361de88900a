"""Downstream evaluation (fine-tuning, probing, dense prediction); filled in by later work."""
