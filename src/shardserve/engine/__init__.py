"""Scheduling: no torch.distributed and no processes here."""
