"""Audio in: WAV bytes -> mono float32 at the model's rate -> Whisper's log-mel features.

``decode_wav`` takes RIFF/WAVE PCM (8, 16, 24 or 32-bit integers; mono or any number of
channels, averaged) at any sample rate; anything else raises ``AudioError`` naming what was
found and what is accepted. ``resample`` is a band-limited (windowed-sinc) polyphase
resampler. ``LogMel`` computes the features transformers' ``WhisperFeatureExtractor`` does,
from the checkpoint's ``preprocessor_config.json``: the waveform padded or cut to
``chunk_length`` seconds, a centred STFT (Hann window, ``n_fft``, ``hop_length``), power
spectrum through Slaney-style mel filters, ``log10`` floored at 1e-10, clamped to 8 below its
maximum and scaled as ``(x + 4) / 4``; the last frame dropped. ``split`` cuts audio longer
than one window into windows at its quietest moments.
"""

from __future__ import annotations

import io
import json
import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ACCEPTED = "WAV (RIFF/WAVE) with integer PCM samples (8, 16, 24 or 32-bit), mono or stereo"


class AudioError(ValueError):
    """Audio this server cannot use; the message says why and what it accepts."""


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """``(samples, rate)``: mono float32 in [-1, 1] and its sample rate."""
    if not data:
        raise AudioError(f"the audio file is empty; send {ACCEPTED}")
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        what = "an MP3 file" if data[:3] == b"ID3" or data[:2] == b"\xff\xfb" else \
            "an Ogg file" if data[:4] == b"OggS" else "a FLAC file" if data[:4] == b"fLaC" \
            else "not a WAV file"
        raise AudioError(f"the audio is {what}; accepted: {ACCEPTED}")
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:  # float or compressed WAV, a cut file
        raise AudioError(f"the WAV file cannot be read ({e}); accepted: {ACCEPTED}") from None
    if rate <= 0:
        raise AudioError(f"the WAV header gives a sample rate of {rate}")
    usable = len(frames) // (width * channels) * width * channels
    raw = np.frombuffer(frames[:usable], dtype=np.uint8)
    if width == 1:  # unsigned 8-bit
        x = (raw.astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # little-endian 24-bit: widen to 32 bits
        b = raw.reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / 2 ** 23
    else:
        x = np.frombuffer(raw.tobytes(), dtype=f"<i{width}").astype(np.float32) / \
            2.0 ** (8 * width - 1)
    x = x.reshape(-1, channels).mean(axis=1) if channels > 1 else x
    return x.astype(np.float32), rate


def resample(x: np.ndarray, rate: int, target: int, taps: int = 6,
             rolloff: float = 0.99) -> np.ndarray:
    """``x`` from ``rate`` to ``target`` samples a second: a windowed-sinc low-pass at
    ``rolloff`` of the lower Nyquist frequency, ``taps`` zero crossings each side, applied as
    one polyphase convolution (one filter per output phase of ``target / gcd``)."""
    if rate == target or len(x) == 0:
        return x.astype(np.float32, copy=False)
    g = math.gcd(rate, target)
    up, down = target // g, rate // g  # output phases, input stride
    cutoff = min(up, down) * rolloff
    width = math.ceil(taps * down / cutoff)
    idx = torch.arange(-width, width + down, dtype=torch.float64) / down
    t = (torch.arange(0, -up, -1, dtype=torch.float64)[:, None] / up + idx[None, :]) * cutoff
    t = t.clamp(-taps, taps)
    window = torch.cos(t * math.pi / taps / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernels = (sinc * window * cutoff / down).to(torch.float32)[:, None, :]  # (up, 1, L)
    wav = torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None]
    wav = F.pad(wav, (width, width + down))
    out = F.conv1d(wav, kernels, stride=down)  # (1, up, frames)
    out = out[0].t().reshape(-1)
    return out[:math.ceil(up * len(x) / down)].numpy()


def split(x: np.ndarray, rate: int, window_s: float, search_s: float = 2.0,
          frame_s: float = 0.02) -> list[tuple[int, int]]:
    """``(start, end)`` sample ranges covering ``x``, each at most ``window_s`` long. A cut
    falls in the quietest ``frame_s`` frame (least energy) of the last ``search_s`` seconds
    before the window is full, so it lands in a pause rather than in a word where the audio
    has one (vLLM cuts long audio the same way)."""
    window, search = int(window_s * rate), int(min(search_s, window_s / 2) * rate)
    frame = max(1, int(frame_s * rate))
    spans, start = [], 0
    while len(x) - start > window:
        lo, hi = start + window - search, start + window
        n = (hi - lo) // frame
        energy = np.square(x[lo:lo + n * frame].astype(np.float64)).reshape(n, frame).sum(1)
        quiet = int(np.argmin(energy[::-1]))  # the last of equally quiet frames
        cut = lo + (n - quiet) * frame - frame // 2
        spans.append((start, cut))
        start = cut
    spans.append((start, len(x)))
    return spans


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log = f >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0),
                    mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)),
                    m * (200.0 / 3))


def mel_filters(rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                fmax: float | None = None) -> np.ndarray:
    """``(n_fft // 2 + 1, n_mels)`` triangular filters, equally spaced on Slaney's mel scale,
    each normalised to unit area (Slaney's norm)."""
    fmax = rate / 2 if fmax is None else fmax
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    bins = np.linspace(0, rate // 2, n_fft // 2 + 1)
    gaps = np.diff(edges)
    slopes = edges[None, :] - bins[:, None]
    rising = -slopes[:, :-2] / gaps[:-1]
    falling = slopes[:, 2:] / gaps[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    return bank * (2.0 / (edges[2:] - edges[:-2]))[None, :]


@dataclass(frozen=True)
class LogMel:
    """Whisper's front end with a checkpoint's settings (``preprocessor_config.json``)."""

    n_mels: int = 80
    rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    chunk_length: int = 30  # seconds a window holds

    @staticmethod
    def from_folder(path: str | Path) -> LogMel:
        cfg = json.loads((Path(path) / "preprocessor_config.json").read_text())
        return LogMel(int(cfg.get("feature_size", 80)), int(cfg.get("sampling_rate", 16000)),
                      int(cfg.get("n_fft", 400)), int(cfg.get("hop_length", 160)),
                      int(cfg.get("chunk_length", 30)))

    @property
    def samples(self) -> int:
        return self.chunk_length * self.rate

    @property
    def frames(self) -> int:
        return self.samples // self.hop_length

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """``(n_mels, frames)`` float32 features of mono audio at ``rate``, padded with
        silence or cut to one window."""
        x = np.zeros(self.samples, dtype=np.float32)
        n = min(len(audio), self.samples)
        x[:n] = audio[:n]
        wav = torch.from_numpy(x)
        stft = torch.stft(wav, self.n_fft, self.hop_length, window=torch.hann_window(self.n_fft),
                          return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        bank = torch.from_numpy(_filters(self.rate, self.n_fft, self.n_mels)).float()
        log = torch.clamp(bank.T @ power, min=1e-10).log10()
        log = torch.maximum(log, log.max() - 8.0)
        return ((log + 4.0) / 4.0).numpy()


_FILTERS: dict[tuple[int, int, int], np.ndarray] = {}


def _filters(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    key = (rate, n_fft, n_mels)
    if key not in _FILTERS:  # Whisper's filters stop at 8 kHz whatever the rate
        _FILTERS[key] = mel_filters(rate, n_fft, n_mels, 0.0, 8000.0)
    return _FILTERS[key]
