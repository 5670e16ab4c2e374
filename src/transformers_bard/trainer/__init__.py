"""Trainers, their configs and loss functions for BARD training (DESIGN 3)."""
