"""HTTP only: thin routes over the engine interface. Imports no torch."""
