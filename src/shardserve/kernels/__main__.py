"""``python -m shardserve.kernels``: build the native CPU kernels now (make setup runs it), and
say in one line whether they are ready; exit 1 if not (the server would run PyTorch paths)."""

import sys

from shardserve import kernels

ready, detail = kernels.status()
print(f"native CPU kernels: {'ready' if ready else 'UNAVAILABLE'}: {detail}")
sys.exit(0 if ready else 1)
