"""Which dtypes a deployment runs in and which kernels run it: chosen once, before any worker
starts, from the checkpoint, the device and whether the native kernels build here, and
reported everywhere (the log, ``shardserve plan``, ``/v2/repository/devices``, a metric
label), so no deployment is ever silently slow.

- CPU with the native kernels: a decoder's linear and embedding weights stay in the
  checkpoint's dtype (bfloat16 or float16 read into float32 registers by the kernels: half the
  bytes of float32 to stream per step), while activations, norms, biases and the KV cache are
  float32 (the kernels' arithmetic, and numerically the better choice).
- CPU without them (no compiler, ``SHARDSERVE_KERNELS=0``), encoders, CUDA: PyTorch's kernels
  in the checkpoint's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardserve.config import ModelConfig


@dataclass(frozen=True)
class Precision:
    weights: str  # dtype of the linear and embedding weights
    compute: str  # dtype of activations, norms, biases and the KV cache
    kernels: str  # "native" or "pytorch"
    note: str  # why, in one line

    @property
    def label(self) -> str:
        """e.g. ``native-bfloat16/float32`` (weights / compute) or ``pytorch-float32``."""
        mixed = f"/{self.compute}" if self.compute != self.weights else ""
        return f"{self.kernels}-{self.weights}{mixed}"


def choose(model: ModelConfig, device_kind: str) -> Precision:
    weights = model.torch_dtype_name
    if device_kind != "cpu":
        return Precision(weights, weights, "pytorch", f"{device_kind}: PyTorch kernels")
    from shardserve import kernels

    ready, why = kernels.status()
    if not ready:
        return Precision(weights, weights, "pytorch",
                         f"native CPU kernels unavailable ({why}): PyTorch kernels, 2-4x "
                         "slower; install a C compiler (cc) and restart")
    if model.is_encoder:
        return Precision(weights, weights, "native" if weights == "float32" else "pytorch",
                         "encoder: PyTorch kernels with the native linear kernels where they "
                         "apply (float32)")
    if weights == "float32":
        return Precision(weights, weights, "native", "native CPU kernels, float32")
    return Precision(weights, "float32", "native",
                     f"native CPU kernels: {weights} weights read into float32 registers "
                     "(half the bytes per step); float32 activations and KV cache")
