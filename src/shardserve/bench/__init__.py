"""Load generators: bounded, loopback only by default."""
