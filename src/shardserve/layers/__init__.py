"""Parallel building blocks. Every sharded parameter carries a ``weight_loader`` that reads only
this rank's slice of the checkpoint tensor; layers take their process group as an argument."""
