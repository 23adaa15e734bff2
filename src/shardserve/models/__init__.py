"""One file per model family; ``registry`` finds the class by ``architectures[0]``."""
