"""Model code. `bard_vl/` is exported next to checkpoints for `trust_remote_code`."""
