"""The model on one rank: its shard of the weights, its paged KV cache, one step at a time.

Every rank runs the same step on its shard; logits are gathered on rank 0 only, and the rank-0
runner samples. The runner keeps each sequence's tokens and block table across steps, so a
step only carries new sequences in full and running ones as deltas.

With pipeline parallelism (a ``stage`` and its ``PipeLink``) every rank of every stage still
receives every step and keeps the same bookkeeping; a stage after the first takes its input
from the previous stage instead of the embedding, a stage before the last hands its output
on, and rank 0 of the last stage samples and answers.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shardserve.config import ModelConfig
from shardserve.layers.attention import AttentionMetadata, PrefillChunk
from shardserve.layers.sampler import RowState, Sampler
from shardserve.models.loader import LoadStats, load_weights
from shardserve.models.registry import model_class
from shardserve.models.whisper import CrossBatch
from shardserve.planner.memory import (
    activation_bytes,
    cross_bytes_per_seq,
    format_bytes,
    kv_bytes_per_token,
    replay_bytes,
)
from shardserve.planner.partition import Stage
from shardserve.planner.specs import QUANTIZATION_BYTES
from shardserve.runtime.group import Group, PipeLink
from shardserve.runtime.messages import StepInput, StepOutput
from shardserve.runtime.replay import Replay, replays_enabled


@dataclass
class _Seq:
    tokens: list[int]
    prompt_len: int
    block_ids: list[int]
    num_computed: int
    sampling: dict
    features: np.ndarray | None = None  # a speech model's audio (encoded at its first step)
    slot: int | None = None  # its cross-attention cache slot, once encoded


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    """``compute_dtype`` (``runtime/precision.py``): of activations, vectors (norms, biases)
    and the KV cache; the linear and embedding weights stay in the config's dtype."""

    def __init__(self, config: ModelConfig, group: Group, device: torch.device,
                 budget: int, compute_dtype: str | None = None,
                 kv_cache_dtype: str | None = None, stage: Stage | None = None,
                 link: PipeLink | None = None) -> None:
        self.config, self.group, self.device, self.budget = config, group, device, budget
        self.stage, self.link = stage or Stage.whole(config.spec.num_layers), link
        self.answers = self.stage.is_last and group.rank == 0  # samples and answers steps
        self.dtype = getattr(torch, config.torch_dtype_name)  # the weights'
        self.compute_name = compute_dtype or config.torch_dtype_name
        self.compute = getattr(torch, self.compute_name)
        self.kv_name = kv_cache_dtype or self.compute_name
        self.kv_dtype = getattr(torch, self.kv_name)
        cls = model_class(config.spec.architecture)
        args = (config.spec, config.context_len, group) + ((stage,) if stage else ())
        with _default_dtype(self.dtype), torch.device("meta"):
            meta = _quantize(cls(*args), config.quantization)
            need = _nbytes(meta, self.compute, config.quantization)
        if need > budget:
            where = f"pipeline {stage.name}, " if stage else ""
            raise MemoryError(f"{where}rank {group.rank}: weights need {format_bytes(need)}, "
                              f"the device budget is {format_bytes(budget)}")
        before = _allocated(device)
        with _default_dtype(self.dtype), device:
            self.model = _quantize(cls(*args), config.quantization)
        self.load_stats: LoadStats = load_weights(self.model, config.path, self.dtype)
        if self.compute != self.dtype:
            _mixed_precision(self.model, self.compute)
        self.weight_bytes = _nbytes(self.model)
        check_loaded(self, before)
        self.sampler = Sampler()
        self.seqs: dict[str, _Seq] = {}
        self.generators: dict[str, torch.Generator] = {}  # survive preemption
        self.block_size = 0
        self.cache_bytes = 0
        self.step_seconds = 0.0  # in step(), waits for the previous stage included
        self.windows_encoded = 0  # audio windows through the encoder (speech models)
        # an encoder-decoder (Whisper): cross-attention cache slots, free ones in order
        self.cross = hasattr(self.model, "cross_kv")
        self.free_slots: list[int] = []
        self.suppress, self.begin_suppress = _suppressed_tokens(config)
        self.replay: Replay | None = None  # set with the KV cache where decode steps may be

    # -- control verbs ---------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int, block_size: int, cross_slots: int = 0,
                          max_seqs: int = 0, max_tokens: int = 2048) -> int:
        """Preallocate ``num_blocks`` blocks of ``block_size`` tokens in every layer (and, for
        an encoder-decoder, ``cross_slots`` sequences' cross-attention keys and values);
        decode steps of up to ``max_seqs`` sequences may be recorded (``runtime/replay.py``)
        in the memory the plan reserves for that, each recording step keeping at most the
        activation reserve of a ``max_tokens``-token step."""
        spec = self.config.spec
        per_token = kv_bytes_per_token(spec, self.group.size, self.kv_name, self.stage)
        need = per_token * num_blocks * block_size
        if self.cross:
            need += cross_slots * cross_bytes_per_seq(spec, self.group.size, self.kv_name)
        if self.weight_bytes + need > self.budget:
            raise MemoryError(
                f"KV cache of {num_blocks} blocks x {block_size} tokens needs "
                f"{format_bytes(need)}; {format_bytes(self.budget - self.weight_bytes)} of the "
                "device budget is left after weights")
        self.free_kv_cache()
        for attn in self.model.attention_layers():
            shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        if self.cross:
            self._allocate_cross(cross_slots)
        self.block_size, self.cache_bytes = block_size, need
        self.replay = None
        if (replays_enabled() and hasattr(self.model, "from_embeddings")
                and self.group.size == 1 and self.device.type == "cpu"):
            self.replay = Replay(self.model, -(-self.config.context_len // block_size),
                                 replay_bytes(spec, 1, max_seqs),
                                 activation_bytes(spec, 1, self.compute_name, max_tokens,
                                                  max_seqs))
        return need

    def _allocate_cross(self, slots: int) -> None:
        blocks, rows = self.config.spec.cross_blocks
        for layer in self.model.decoder_layers:
            c = layer.encoder_attn
            shape = (slots * blocks, rows, c.num_heads, c.head_dim)
            layer.cross_k = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            layer.cross_v = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.free_slots = list(range(slots))

    def free_kv_cache(self) -> None:
        self.replay = None  # its recordings point into the cache
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = None
        if self.cross:
            self._allocate_cross(0)
        self.seqs.clear()
        self.cache_bytes = 0

    def ping(self) -> int:
        """Answer at once: the executor's health check (a hung rank never answers)."""
        return self.group.rank

    def time_all_reduce(self, numel: int, reps: int = 20) -> float:
        """Median seconds of one sum all-reduce of ``numel`` float32 values through this
        rank's group, as the layers call it (``shardserve calibrate``)."""
        x = torch.ones(int(numel), device=self.device)
        self.group.all_reduce(x)  # warm-up, and every rank has arrived
        times = []
        for _ in range(max(1, int(reps))):
            t0 = time.perf_counter()
            self.group.all_reduce(x)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def stats(self) -> dict:
        return {"rank": self.group.rank, "weight_bytes": self.weight_bytes,
                "cache_bytes": self.cache_bytes, "budget": self.budget,
                "loaded_bytes": self.loaded_bytes,
                "bytes_read": self.load_stats.bytes_read,
                "largest_read": self.load_stats.largest_read,
                "comm_seconds": self.group.comm_seconds, "num_seqs": len(self.seqs),
                "stage": self.stage.index, "step_seconds": self.step_seconds,
                "pipe_wait_seconds": self.link.wait_seconds if self.link else 0.0,
                "windows_encoded": self.windows_encoded,
                "replayed_steps": self.replay.replays if self.replay else 0}

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], features: np.ndarray | None = None
                      ) -> np.ndarray:
        """Logits at every position of one sequence (T, V), in a scratch one-block cache (for
        a speech model, of the audio ``features`` in a scratch cross-attention slot)."""
        layers = self.model.attention_layers()
        saved = [(a.k_cache, a.v_cache) for a in layers]
        saved_cross = [(x.cross_k, x.cross_v) for x in self.model.decoder_layers] \
            if self.cross else []
        free = self.free_slots
        try:
            n = len(token_ids)
            for a in layers:
                a.k_cache = torch.zeros(1, n, a.num_kv_heads, a.head_dim, dtype=self.kv_dtype,
                                        device=self.device)
                a.v_cache = torch.zeros_like(a.k_cache)
            ids = torch.tensor(token_ids, device=self.device)
            pos = torch.arange(n, device=self.device)
            chunk = PrefillChunk(torch.zeros(1, dtype=torch.long, device=self.device), 0, n, n)
            meta = AttentionMetadata(pos, 0, None, None, [chunk])
            if self.cross:
                if features is None:
                    raise ValueError("a speech model's logits need the audio's features")
                self._allocate_cross(1)
                self._encode([features], [0])
                meta.cross = CrossBatch.build([0], [n], self.config.spec, self.device)
            hidden = self._forward(ids, pos, meta)
            if not self.stage.is_last:
                return None
            logits = self.model.compute_logits(hidden)  # rank 0 only
            return None if logits is None else logits.float().cpu().numpy()
        finally:
            for a, (k, v) in zip(layers, saved, strict=True):
                a.k_cache, a.v_cache = k, v
            for x, (k, v) in zip(self.model.decoder_layers if self.cross else [], saved_cross,
                                 strict=True):
                x.cross_k, x.cross_v = k, v
            self.free_slots = free

    @torch.inference_mode()
    def encode(self, token_ids: list[list[int]], pooling: str = "mean",
               normalize: bool = False) -> np.ndarray | None:
        """Encoders: one padded batch through the model. ``pooling`` "mean" (over real
        tokens), "cls", or "none" (the padded hidden states); a classifier returns its logits.
        Rank 0 returns the result."""
        B, T = len(token_ids), max(map(len, token_ids))
        ids = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for i, t in enumerate(token_ids):
            ids[i, :len(t)] = torch.tensor(t)
            mask[i, :len(t)] = 1
        out = self.model(ids.to(self.device), mask.to(self.device)).float()
        if out.dim() == 3 and pooling == "mean":  # (B, T, H)
            m = mask.to(out.device, out.dtype)[:, :, None]
            out = (out * m).sum(1) / m.sum(1)
        elif out.dim() == 3 and pooling == "cls":
            out = out[:, 0]
        if normalize and out.dim() == 2:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy() if self.group.rank == 0 else None

    # -- the step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, inp: StepInput) -> StepOutput | None:
        """Run one batch; the answering rank returns the sampled tokens, others ``None``."""
        t0 = time.perf_counter()
        try:
            out = self._step(inp, t0)
        except BaseException:
            if inp.feed_samples:
                self._feed_placeholders(inp)
            raise
        else:
            if inp.feed_samples:
                self._feed(out)
            return out
        finally:
            self.step_seconds += time.perf_counter() - t0

    def _step(self, inp: StepInput, t0: float) -> StepOutput | None:
        self._apply_deltas(inp)
        order = self._order(inp)
        if not order:  # only releases
            return self._sample(order, [], None, self.group.comm_seconds, t0) \
                if self.answers else None
        ids, positions, meta, last_rows = self._prepare(order)
        comm0 = self.group.comm_seconds
        if self.cross:
            meta.cross = self._cross_batch(order)
        for req_id, n in order:
            self.seqs[req_id].num_computed += n
        done = [i for i, (r, _) in enumerate(order)
                if self.seqs[r].num_computed == len(self.seqs[r].tokens)]
        if self.replay is not None and self.replay.takes(meta, len(order)):
            logits = self._forward(ids, positions, meta, self.replay.run)
            if not self.stage.is_last:
                return None
            return self._sample(order, done, logits, comm0, t0)  # every sequence is done
        hidden = self._forward(ids, positions, meta)
        if not self.stage.is_last:
            return None
        logits = None
        if done:
            logits = self.model.compute_logits(hidden[last_rows[done]])  # (B, V) on rank 0
        if not self.answers:
            return None
        return self._sample(order, done, logits, comm0, t0)

    def _feed(self, out: StepOutput | None) -> None:
        """Append each sampled token to its sequence: the step sent behind this one computes
        it. A row the sampler failed gets token 0, so that step still runs; the engine has
        ended that sequence and drops what it computes."""
        if out is None or self.group.size > 1 or self.link is not None:
            raise RuntimeError("feed_samples needs a single worker that samples every step")
        for req_id, token in zip(out.req_ids, out.token_ids.tolist(), strict=True):
            self.seqs[req_id].tokens.append(max(token, 0))

    def _feed_placeholders(self, inp: StepInput) -> None:
        """After a failed step: each of its sequences whose tokens are all computed gets a
        placeholder token, so the step already sent behind this one runs for its other
        sequences (the engine fails these and drops what they compute)."""
        for req_id in inp.req_ids:
            seq = self.seqs.get(req_id)
            if seq is not None and seq.num_computed >= len(seq.tokens):
                seq.tokens.append(0)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 run=None) -> torch.Tensor:
        """This stage's part of the forward pass: from the embedding or the previous stage,
        to the final hidden states or the next stage; ``run`` in place of the model (a
        replayed step's: to the logits). A stage that fails still tells the next one, so no
        rank waits for a tensor that will never come."""
        run = run or self.model
        if self.link is None:
            if self.cross:
                return run(ids, positions, meta, meta.cross)
            return run(ids, positions, meta)
        shape = (2, ids.shape[0], self.config.spec.hidden_size)
        numel = shape[0] * shape[1] * shape[2]
        try:
            carried = None if self.stage.is_first else self.link.recv(shape, self.compute)
            out = run(ids, positions, meta, carried)
        except Exception:
            if not self.stage.is_last:
                self.link.send(None, numel, self.compute)
            raise
        if not self.stage.is_last:
            self.link.send(out, numel, self.compute)  # (hidden, residual)
        return out

    def _apply_deltas(self, inp: StepInput) -> None:
        for req_id in inp.finished_ids:
            self._drop(req_id)
            self.generators.pop(req_id, None)
        for req_id in inp.preempted_ids:
            self._drop(req_id)
        for new in inp.new_requests:
            self._drop(new.req_id)
            self.seqs[new.req_id] = _Seq(list(new.token_ids), new.prompt_len,
                                         list(new.block_ids), new.num_computed, new.sampling,
                                         new.features)
            seed = new.sampling.get("seed")
            if seed is not None and new.req_id not in self.generators:
                self.generators[new.req_id] = torch.Generator(self.device).manual_seed(seed)
        for req_id, toks, blocks in zip(inp.cached_ids, inp.cached_new_tokens,
                                        inp.cached_new_blocks, strict=True):
            seq = self.seqs[req_id]
            seq.tokens.extend(toks)
            seq.block_ids.extend(blocks)

    def _drop(self, req_id: str) -> None:
        seq = self.seqs.pop(req_id, None)
        if seq is not None and seq.slot is not None:
            self.free_slots.append(seq.slot)

    def _cross_batch(self, order: list[tuple[str, int]]) -> CrossBatch:
        """Encode the audio of the step's sequences that have no slot yet (new, or back
        from preemption), then say which slot each reads."""
        todo = [self.seqs[r] for r, _ in order if self.seqs[r].slot is None]
        if todo:
            if len(todo) > len(self.free_slots):
                raise RuntimeError(f"{len(todo)} sequences need a cross-attention slot; "
                                   f"{len(self.free_slots)} are free")
            if any(s.features is None for s in todo):
                raise ValueError("a speech model's sequence came without its audio features")
            slots = [self.free_slots.pop(0) for _ in todo]
            for s, slot in zip(todo, slots, strict=True):
                s.slot = slot
            self._encode([s.features for s in todo], slots)
        return CrossBatch.build([self.seqs[r].slot for r, _ in order], [n for _, n in order],
                                self.config.spec, self.device)

    def _encode(self, features: list[np.ndarray], slots: list[int]) -> None:
        """Run the encoder over each audio window (one at a time: the activation reserve
        holds one) and keep every decoder layer's cross-attention keys and values in the
        given slots."""
        for f, slot in zip(features, slots, strict=True):
            x = torch.from_numpy(np.array(f, np.float32))[None].to(self.device, self.compute)
            states = self.model.encode(x)[0]
            self.windows_encoded += 1
            for layer, (k, v) in zip(self.model.decoder_layers, self.model.cross_kv(states),
                                     strict=True):
                layer.keep(slot, k, v)

    @staticmethod
    def _order(inp: StepInput) -> list[tuple[str, int]]:
        """One-token sequences first (they attend in one batched call), then prefill chunks."""
        pairs = list(zip(inp.req_ids, inp.num_tokens, strict=True))
        return [p for p in pairs if p[1] == 1] + [p for p in pairs if p[1] != 1]

    def _prepare(self, order: list[tuple[str, int]]):
        """Flat token ids, positions and attention metadata for the scheduled sequences."""
        seqs = [self.seqs[r] for r, _ in order]
        if order[-1][1] == 1:  # one token each (``_order`` puts those first): plain lists
            return self._prepare_decode(seqs)
        bs, dev = self.block_size, self.device
        ns = np.array([n for _, n in order], dtype=np.int64)
        starts = np.array([s.num_computed for s in seqs], dtype=np.int64)
        ids = np.concatenate([s.tokens[c:c + n] for s, c, n in zip(seqs, starts, ns,
                                                                    strict=True)])
        spans = [np.arange(c, c + n) for c, n in zip(starts, ns, strict=True)]
        tables = [np.asarray(s.block_ids, dtype=np.int64) for s in seqs]
        positions = np.concatenate(spans)
        slots = np.concatenate([tab[p // bs] * bs + p % bs
                                for tab, p in zip(tables, spans, strict=True)])
        D = int((ns == 1).sum())
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        decode_tables = decode_ctx = None
        if D:
            width = max(len(tables[i]) for i in range(D))
            padded = np.zeros((D, width), dtype=np.int64)
            for i in range(D):
                padded[i, :len(tables[i])] = tables[i]
            decode_tables, decode_ctx = t(padded), t(starts[:D] + 1)
        row_starts = np.concatenate([[0], np.cumsum(ns)])
        prefills = [PrefillChunk(t(tables[i]), int(row_starts[i]), int(ns[i]),
                                 int(starts[i] + ns[i])) for i in range(D, len(seqs))]
        meta = AttentionMetadata(t(slots), D, decode_tables, decode_ctx, prefills)
        return t(ids), t(positions), meta, t(row_starts[1:] - 1)

    def _prepare_decode(self, seqs: list[_Seq]):
        """``_prepare`` for a step of one token a sequence (every decode step), from Python
        lists in one conversion each rather than numpy arrays a sequence."""
        bs, dev = self.block_size, self.device
        pos = [s.num_computed for s in seqs]
        ids = [s.tokens[c] for s, c in zip(seqs, pos, strict=True)]
        slots = [s.block_ids[c // bs] * bs + c % bs for s, c in zip(seqs, pos, strict=True)]
        width = max(len(s.block_ids) for s in seqs)
        tables = [s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs]
        t = lambda a: torch.tensor(a, dtype=torch.int64, device=dev)  # noqa: E731
        positions = t(pos)
        meta = AttentionMetadata(t(slots), len(seqs), t(tables), positions + 1, [])
        return t(ids), positions, meta, torch.arange(len(seqs), device=dev)

    def _sample(self, order, done, logits, comm0: float, t0: float) -> StepOutput:
        if not done:
            return StepOutput([], np.zeros(0, dtype=np.int64),
                              comm_seconds=self.group.comm_seconds - comm0,
                              worker_seconds=time.perf_counter() - t0)
        req_ids = [order[i][0] for i in done]
        rows = [RowState(self.seqs[r].sampling, self.generators.get(r), self.seqs[r].tokens,
                         self.seqs[r].prompt_len) for r in req_ids]
        if self.suppress or self.begin_suppress or any(
                r.params.get("allowed") or r.params.get("prefix_allowed") for r in rows):
            logits = self._restrict(logits.float(), rows)
        res = self.sampler(logits, rows)
        np_ = lambda x: None if x is None else x.cpu().numpy()  # noqa: E731
        return StepOutput(req_ids, np_(res.token_ids), np_(res.logprobs), np_(res.top_ids),
                          np_(res.top_logprobs), self.group.comm_seconds - comm0,
                          time.perf_counter() - t0,
                          {req_ids[i]: why for i, why in res.failed.items()})

    def _restrict(self, logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
        """The generation config's ``suppress_tokens`` never come; ``begin_suppress_tokens``
        not as the first free token (as transformers' logits processors do; the first after
        any ``prefix_allowed_token_ids``); a row's allowed tokens, where it has them, are the
        only ones left (at a prefix step, only the most likely of them)."""
        if self.suppress:
            logits[:, self.suppress] = _SUPPRESSED
        first = [i for i, r in enumerate(rows)
                 if len(r.tokens) - r.prompt_len == len(r.params.get("prefix_allowed") or ())]
        if self.begin_suppress and first:
            logits[torch.tensor(first)[:, None], torch.tensor(self.begin_suppress)[None]] = \
                _SUPPRESSED
        for i, row in enumerate(rows):
            allowed, greedy = _allowed(row)
            if allowed:
                allowed = torch.tensor(allowed)
                kept = logits[i, allowed]
                if greedy:  # a prefix step: its most likely token, whatever the sampling
                    allowed, kept = allowed[kept.argmax()], kept.max()
                logits[i] = _SUPPRESSED
                logits[i, allowed] = kept
        return logits


def _allowed(row: RowState) -> tuple[list[int] | None, bool]:
    """The tokens ``row`` may take at this step and whether it takes the most likely of them:
    its prefix's list for this step (greedy), else its ``allowed_token_ids`` (None: any)."""
    prefix, step = row.params.get("prefix_allowed"), len(row.tokens) - row.prompt_len
    if prefix and step < len(prefix):
        return prefix[step], True
    return row.params.get("allowed"), False


# A suppressed token's logit: far below any real one (no temperature or penalty brings it
# back), and finite, so the sampler's check for broken logits does not fail the row.
_SUPPRESSED = -1e30


def _suppressed_tokens(config: ModelConfig) -> tuple[list[int], list[int]]:
    """``suppress_tokens`` and ``begin_suppress_tokens`` of the checkpoint's generation config
    (config.json's where the generation config has none), within the vocabulary."""
    found: dict[str, list[int]] = {}
    for name in ("config.json", "generation_config.json"):
        path = Path(config.path) / name
        if path.is_file():
            data = json.loads(path.read_text())
            for key in ("suppress_tokens", "begin_suppress_tokens"):
                if data.get(key):
                    found[key] = [int(t) for t in data[key]]
    vocab = config.spec.vocab_size
    return tuple([t for t in found.get(k, []) if 0 <= t < vocab]
                 for k in ("suppress_tokens", "begin_suppress_tokens"))


def _quantize(model: torch.nn.Module, quantization: str | None) -> torch.nn.Module:
    """Mark the layers that take ``quantization`` (``layers.linear``); they quantize their
    weights once loaded."""
    if quantization is not None:
        for module in model.modules():
            if hasattr(module, "quantization"):
                module.quantization = quantization
    return model


def trim_heap() -> None:
    """Give back what is free in the heap now (after loading: conversions, file buffers)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def check_loaded(runner, before: int | None) -> None:
    """What loading really took, measured from ``before`` (taken once the model's code and
    its meta build were ready) to now, after the heap has given back what the load freed:
    process memory, not the planner's arithmetic, so a layer the planner does not know or a
    loader that keeps a copy shows here. ``MemoryError`` past the device budget. Sets
    ``runner.loaded_bytes`` (None where the platform does not say)."""
    trim_heap()
    after = _allocated(runner.device)
    runner.loaded_bytes = after - before if None not in (before, after) else None
    if runner.loaded_bytes is not None and runner.loaded_bytes > runner.budget:
        raise MemoryError(f"rank {runner.group.rank}: loading took "
                          f"{format_bytes(runner.loaded_bytes)} of memory (measured), the "
                          f"device budget is {format_bytes(runner.budget)}")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _allocated(device: torch.device) -> int | None:
    """Memory this process holds on ``device`` now: CUDA's allocated bytes, or on a CPU what
    malloc has handed out and not taken back (glibc's ``mallinfo2``: in-use heap chunks and
    mmapped blocks; tensors, not the mapped checkpoint files). Not resident pages: a worker
    keeps what it frees, and a load that reuses memory freed before it would not grow the
    process (``RssAnon`` measured such a load short of its weights). ``RssAnon`` where there
    is no ``mallinfo2``; None where the platform says neither."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        fn = ctypes.CDLL(None).mallinfo2
        fn.restype = _MallInfo2
        info = fn()
        return info.uordblks + info.hblkhd
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _nbytes(model: torch.nn.Module, vectors: torch.dtype | None = None,
            quantization: str | None = None) -> int:
    """Bytes of the parameters and quantization scales. Before loading (a meta model),
    ``vectors`` counts vectors in that dtype (``_mixed_precision`` converts them) and
    ``quantization`` the weights of the layers it marked in its bytes plus a float32 scale per
    output feature."""
    size = None if vectors is None else torch.tensor([], dtype=vectors).element_size()
    quantized = {}
    for m in model.modules():
        if getattr(m, "quantization", None) and m.weight.dim() == 2:
            quantized[id(m.weight)] = QUANTIZATION_BYTES[m.quantization]
    total = 0
    for p in model.parameters():
        if id(p) in quantized:
            total += p.numel() * quantized[id(p)] + p.shape[0] * 4
        else:
            total += p.numel() * (size if size and p.dim() == 1 else p.element_size())
    scales = {id(s): s for m in model.modules()
              if isinstance(s := getattr(m, "weight_scale", None), torch.Tensor)}
    return total + sum(s.numel() * s.element_size() for s in scales.values())


def _mixed_precision(model: torch.nn.Module, compute: torch.dtype) -> None:
    """After loading: vectors (norms, biases) to the compute dtype, embeddings hand out rows
    in it; matrices stay in their own dtype (the native kernels read them as they are)."""
    for p in model.parameters():
        if p.dim() == 1:
            p.data = p.data.to(compute)
    for module in model.modules():
        if hasattr(module, "out_dtype"):
            module.out_dtype = compute
