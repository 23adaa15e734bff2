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
- ``quantization: int8`` (decoders on the CPU with the native kernels): the linear layers and
  the LM head quantized at load to int8 with a float32 scale per output feature, read into
  float32 registers by the packed GEMM (a quarter of float32's bytes per step). Anywhere else
  it is refused when the deployment is created, with the reason, rather than served slowly.
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
    quantization: str | None = None  # of the linear layers and LM head (e.g. int8)

    @property
    def label(self) -> str:
        """e.g. ``native-bfloat16/float32`` (weights / compute), ``native-int8/float32`` or
        ``pytorch-float32``."""
        weights = self.quantization or self.weights
        mixed = f"/{self.compute}" if self.compute != weights else ""
        return f"{self.kernels}-{weights}{mixed}"


def choose(model: ModelConfig, device_kind: str) -> Precision:
    p = _choose(model, device_kind)
    if model.quantization is None:
        return p
    if model.is_encoder:
        raise ValueError(f"quantization {model.quantization!r} applies to generative models "
                         "(kind: llm); serve this encoder without it")
    if p.kernels != "native":
        raise ValueError(f"quantization {model.quantization!r} runs on the native CPU kernels, "
                         f"which this deployment cannot use ({p.note}); serve it without "
                         "quantization")
    return Precision(p.weights, "float32", "native",
                     f"native CPU kernels: {model.quantization} linear layers and LM head "
                     "(a float32 scale per output feature, quantized at load), "
                     f"{p.weights} embeddings; float32 activations and KV cache",
                     model.quantization)


def _choose(model: ModelConfig, device_kind: str) -> Precision:
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
