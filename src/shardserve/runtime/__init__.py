"""Every side effect: processes, ranks, collectives."""
