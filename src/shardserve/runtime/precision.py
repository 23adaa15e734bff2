"""Which dtypes a deployment runs in and which kernels run it: chosen once, before any worker
starts, from the checkpoint, the device and whether the native kernels build here, and
reported everywhere (the log, ``shardserve plan``, ``/v2/repository/devices``, a metric
label), so no deployment is ever silently slow.

- CPU with the native kernels: a decoder's linear and embedding weights and its KV cache stay
  in the checkpoint's dtype (half the bytes of float32 to stream per step), while activations,
  norms and biases are float32. bfloat16 weights run on AMX's bfloat16 tiles where the CPU
  has them, or on vdpbf16ps where it multiplies at twice float32 FMA's rate (``ops.pair_mode``;
  activations rounded to bfloat16 at each linear layer, float32 sums, as oneDNN and
  transformers' bf16 matmul); float16 weights, and bfloat16 ones elsewhere, are read into
  float32 registers (float32 arithmetic).
- CPU without them (no compiler, ``SHARDSERVE_KERNELS=0``), encoders, CUDA: PyTorch's kernels
  in the checkpoint's dtype.
- ``quantization: int8`` (decoders on the CPU with the native kernels): the linear layers and
  the LM head quantized at load to int8 with a float32 scale per output feature, widened in
  the packed GEMM (to bfloat16 for the bfloat16 dot products, else to float32; a quarter of
  float32's bytes per step). Anywhere else it is refused when the deployment is created,
  with the reason, rather than served slowly.
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
    kv_cache: str = ""  # dtype of the KV cache ("": the compute dtype)

    @property
    def kv(self) -> str:
        """The KV cache's dtype."""
        return self.kv_cache or self.compute

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
    from shardserve.kernels import ops

    return Precision(p.weights, "float32", "native",
                     f"native CPU kernels: {model.quantization} linear layers and LM head "
                     "(a float32 scale per output feature, quantized at load) on "
                     f"{ops.linear_path(p.weights, model.quantization)}; "
                     f"{p.weights} embeddings; float32 activations, {p.kv} KV cache",
                     model.quantization, p.kv_cache)


def _choose(model: ModelConfig, device_kind: str) -> Precision:
    weights = model.torch_dtype_name
    if device_kind != "cpu":
        return Precision(weights, weights, "pytorch", f"{device_kind}: PyTorch kernels")
    from shardserve import kernels

    ready, why = kernels.status()
    if model.kind == "recommender":
        if ready:
            return Precision(weights, weights, "native", f"recommender: {weights} embedding "
                             "tables pooled by the native embedding-bag kernel, PyTorch "
                             "linear layers")
        return Precision(weights, weights, "pytorch", f"recommender: {weights} embedding "
                         f"tables pooled by PyTorch's embedding_bag (native kernels "
                         f"unavailable: {why}), PyTorch linear layers")
    if not ready:
        return Precision(weights, weights, "pytorch",
                         f"native CPU kernels unavailable ({why}): PyTorch kernels, 2-4x "
                         "slower; install a C compiler (cc) and restart")
    if model.is_encoder:
        return Precision(weights, weights, "native" if weights == "float32" else "pytorch",
                         "encoder: PyTorch kernels with the native linear kernels where they "
                         "apply (float32)")
    from shardserve.kernels import ops

    path = ops.linear_path(weights)
    if weights == "float32":
        return Precision(weights, weights, "native", f"native CPU kernels: {path}")
    # The KV cache in the checkpoint's 16 bits too, as vLLM's kv_cache_dtype=auto: half the
    # bytes decode attention streams, twice the tokens per byte of budget.
    return Precision(weights, "float32", "native",
                     f"native CPU kernels: {weights} weights (half the bytes per step) on "
                     f"{path}; {weights} KV cache; float32 activations and norms",
                     kv_cache=weights)
