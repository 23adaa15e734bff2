"""The audio front end: WAV decoding (every PCM width, stereo, bad files), the resampler
against the signal it should give, log-mel features against transformers'
WhisperFeatureExtractor (1e-4), and long audio cut into windows at its pauses."""

import io
import wave

import numpy as np
import pytest

from shardserve.audio import AudioError, LogMel, decode_wav, mel_filters, resample, split


def sweep(seconds: float, rate: int = 16000, f0: float = 100.0, f1: float = 4000.0):
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t * t)
    return (0.5 * np.sin(phase)).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> bytes:
    x = np.repeat(samples[:, None], channels, axis=1).reshape(-1)
    if width == 1:
        raw = np.clip(np.round(x * 127 + 128), 0, 255).astype(np.uint8).tobytes()
    elif width == 3:
        v = np.round(x * (2 ** 23 - 1)).astype(np.int32)
        raw = np.stack([v & 255, v >> 8 & 255, v >> 16 & 255], 1).astype(np.uint8).tobytes()
    else:
        raw = np.round(x * (2 ** (8 * width - 1) - 1)).astype(f"<i{width}").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return buf.getvalue()


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2])
def test_wav_pcm_of_every_width_decodes(width, channels):
    x = sweep(0.5, 8000)
    got, rate = decode_wav(wav_bytes(x, 8000, width, channels))
    assert rate == 8000 and got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, x, atol=2.0 / 2 ** (8 * width - 1) + 1e-6)


def test_bad_files_say_what_is_accepted():
    with pytest.raises(AudioError, match="empty"):
        decode_wav(b"")
    with pytest.raises(AudioError, match="MP3 file; accepted: WAV"):
        decode_wav(b"ID3\x04" + bytes(100))
    with pytest.raises(AudioError, match="not a WAV file; accepted: WAV"):
        decode_wav(b"hello, not audio at all")
    cut = wav_bytes(sweep(0.1), 16000)[:30]  # a header cut short
    with pytest.raises(AudioError, match="cannot be read"):
        decode_wav(cut)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_gives_the_signal_at_the_new_rate(rate):
    """A 440 Hz tone at ``rate`` becomes the same tone at 16 kHz (away from the edges, where
    the filter sees the zeros outside the signal)."""
    secs = 0.5
    tone = lambda r: np.sin(2 * np.pi * 440 * np.arange(int(secs * r)) / r)  # noqa: E731
    got = resample(tone(rate).astype(np.float32), rate, 16000)
    want = tone(16000)
    assert abs(len(got) - len(want)) <= 1
    n = min(len(got), len(want))
    np.testing.assert_allclose(got[200:n - 200], want[200:n - 200], atol=2e-3)


def test_mel_filters_match_transformers():
    from transformers.audio_utils import mel_filter_bank

    for mels in (80, 128):
        want = mel_filter_bank(num_frequency_bins=201, num_mel_filters=mels, min_frequency=0.0,
                               max_frequency=8000.0, sampling_rate=16000, norm="slaney",
                               mel_scale="slaney")
        np.testing.assert_allclose(mel_filters(16000, 400, mels, 0.0, 8000.0), want,
                                   atol=1e-12)


@pytest.mark.parametrize("mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(mels):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=mels)
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(16000 * 4)).astype(np.float32)
    for audio in (sweep(2.5), sweep(29.9), sweep(31.0), noise, np.zeros(1600, np.float32)):
        want = fe(audio, sampling_rate=16000, return_tensors="np").input_features[0]
        got = LogMel(n_mels=mels)(audio)
        assert got.shape == want.shape == (mels, 3000)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_long_audio_is_cut_into_windows_at_its_pauses():
    rate = 16000
    talk = lambda s: sweep(s, rate)  # noqa: E731
    quiet = lambda s: np.zeros(int(s * rate), np.float32)  # noqa: E731
    # talk to 28.6 s, a pause to 29.0 s, talk past the first window, a pause at 57.5-57.9 s
    x = np.concatenate([talk(28.6), quiet(0.4), talk(28.5), quiet(0.4), talk(20.0)])
    spans = split(x, rate, 30.0)
    assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]]  # contiguous
    assert spans[-1][1] == len(x) and all(b - a <= 30 * rate for a, b in spans)
    assert len(spans) == 3
    assert 28.6 <= spans[0][1] / rate <= 29.0 and 57.5 <= spans[1][1] / rate <= 57.9
    # no pause: still cut within the window, none longer than it, nothing lost
    x = sweep(95.0, rate)
    spans = split(x, rate, 30.0)
    assert len(spans) == 4 and spans[-1][1] == len(x)
    assert all(28 * rate <= b - a <= 30 * rate for a, b in spans[:-1])
    assert split(x[:30 * rate], rate, 30.0) == [(0, 30 * rate)]  # one window: uncut
