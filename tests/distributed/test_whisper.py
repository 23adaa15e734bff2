"""Whisper against transformers on the same random-weight checkpoint and the same audio, at
tp=1 and tp=2: encoder states and logits within 1e-4, greedy token ids equal for the whole
transcription (444 tokens: a random Whisper never says <|endoftext|>) against transformers'
greedy generate (which applies the generation config's suppressed tokens), the language
transformers' detect_language finds, and long audio window by window. The
audio is made here: a sine sweep, noise, and speech from espeak-ng (22.05 kHz, so the
resampler is on the path)."""

import json
import shutil
import subprocess
import threading

import numpy as np
import pytest
import torch

from shardserve import LLM, SamplingParams, test_models
from shardserve.audio import LogMel, decode_wav, resample, split
from shardserve.config import ModelConfig
from shardserve.engine.errors import InvalidRequest
from shardserve.runtime.group import FakeGroup
from shardserve.runtime.model_runner import ModelRunner
from tests.unit.test_audio import sweep

pytestmark = pytest.mark.slow


def speech(text: str, tmp_path) -> bytes:
    """A WAV file of ``text`` spoken by espeak-ng (``make test``'s set-up installs it)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: make setup installs it (apt-get install espeak-ng)")
    out = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(out), text], check=True, timeout=60)
    return out.read_bytes()


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return test_models.write(tmp_path_factory.mktemp("whisper"), "whisper", "tiny")


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    rng = np.random.default_rng(1)
    wav = speech("what will the weather be like tomorrow in Paris",
                 tmp_path_factory.mktemp("speech"))
    samples, rate = decode_wav(wav)
    assert rate == 22050
    return {"sweep": sweep(3.0), "noise": (0.05 * rng.standard_normal(16000 * 7)).astype(
        np.float32), "speech": resample(samples, rate, 16000), "speech_wav": wav}


@pytest.fixture(scope="module")
def reference(whisper):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(str(whisper)).eval()


def hf_greedy(hf, features: np.ndarray, prompt: list[int], max_new: int) -> list[int]:
    """transformers' own greedy generate from the forced start tokens (the generic one: its
    Whisper override adds long-form and timestamp logic past ``max_new_tokens``), which
    applies the generation config's suppressed tokens."""
    from transformers.generation.utils import GenerationMixin

    with torch.no_grad():
        out = GenerationMixin.generate(hf, input_features=torch.from_numpy(features)[None],
                                       decoder_input_ids=torch.tensor([prompt]),
                                       max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_encoder_states_match_transformers_at_tp_1_and_2(whisper, reference, audio):
    features = LogMel()(audio["speech"])
    with torch.no_grad():
        want = reference.model.encoder(torch.from_numpy(features)[None]).last_hidden_state[0]
    cfg = ModelConfig(str(whisper))
    for tp in (1, 2):
        got: list = [None] * tp

        def rank(group, got=got):
            runner = ModelRunner(cfg, group, torch.device("cpu"), 1 << 30)
            with torch.inference_mode():
                got[group.rank] = runner.model.encode(torch.from_numpy(features)[None])[0]

        threads = [threading.Thread(target=rank, args=(g,)) for g in FakeGroup.make(tp)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for states in got:  # every rank ends with the whole states
            torch.testing.assert_close(states, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_transcriptions_match_transformers(whisper, reference, audio, tp):
    names = ["sweep", "noise", "speech"]
    with LLM(str(whisper), tensor_parallel_size=tp) as llm:
        outs = llm.transcribe([audio[n] for n in names], sampling_rate=16000)
        # the WAV file itself (22.05 kHz) goes through the same front end
        from_file = llm.transcribe(audio["speech_wav"])[0]
        prompt = outs[0].prompt_token_ids
        features = [LogMel()(audio[n]) for n in names]
        logits = llm.engine.executor.collective_rpc(
            "prompt_logits", token_ids=prompt + outs[2].outputs[0].token_ids[:40],
            features=features[2])[0]
    assert len(prompt) == 4  # <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>
    for name, out, f in zip(names, outs, features, strict=True):
        got = out.outputs[0].token_ids
        assert got == hf_greedy(reference, f, prompt, 448 - len(prompt)), name
        assert len(got) == 444 and out.outputs[0].finish_reason == "length"
    assert from_file.outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 3  # the audio matters
    with torch.no_grad():
        ids = torch.tensor([prompt + outs[2].outputs[0].token_ids[:40]])
        want = reference(input_features=torch.from_numpy(features[2])[None],
                         decoder_input_ids=ids).logits[0]
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4, rtol=1e-4)


def test_bad_audio_and_options_are_refused_and_the_model_keeps_serving(whisper, audio):
    with LLM(str(whisper), max_num_seqs=4) as llm:
        cases = [((b"ID3" + bytes(64),), {}, "MP3 file; accepted: WAV"),
                 ((b"",), {}, "empty"),
                 ((audio["sweep"],), {"language": "xx"}, "language 'xx' is not one"),
                 ((audio["sweep"],), {"task": "summarize"}, "task must be one of"),
                 ((audio["sweep"],), {}, "need their sample rate")]
        for args, kwargs, message in cases:
            with pytest.raises(InvalidRequest, match=message):
                llm.transcribe(*args, **kwargs)
        with pytest.raises(InvalidRequest, match="audio features must be float \\[80, 3000\\]"):
            llm.engine.add_request("x", [1, 2], SamplingParams(max_tokens=4),
                                   features=np.zeros((80, 100), np.float32))
        # more requests than cross-attention slots: they queue, and every one is answered
        outs = llm.transcribe([audio["sweep"]] * 6, "en", sampling_rate=16000,
                              sampling_params=SamplingParams(temperature=0, max_tokens=8))
        assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
        assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
        de = llm.transcribe(audio["sweep"], sampling_rate=16000, language="de",
                            sampling_params=SamplingParams(temperature=0, max_tokens=8))[0]
        assert de.prompt_token_ids[1] != outs[0].prompt_token_ids[1]  # <|de|>, not <|en|>


def test_bfloat16_checkpoint_runs_close_to_its_float32_reference(tmp_path, audio):
    """A bfloat16 checkpoint (16-bit weights and caches, float32 compute) against
    transformers in float32 on the same rounded weights."""
    from transformers import WhisperForConditionalGeneration

    path = test_models.write(tmp_path / "bf16", "whisper", "tiny", dtype="bfloat16")
    hf = WhisperForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    features = LogMel()(audio["speech"])
    with LLM(str(path), tensor_parallel_size=2) as llm:
        assert llm.engine.precision.weights == "bfloat16"
        out = llm.transcribe(audio["speech"], sampling_rate=16000,
                             sampling_params=SamplingParams(temperature=0, max_tokens=24))[0]
        ids = out.prompt_token_ids + out.outputs[0].token_ids
        logits = llm.engine.executor.collective_rpc("prompt_logits", token_ids=ids,
                                                    features=features)[0]
    with torch.no_grad():
        want = hf(input_features=torch.from_numpy(features)[None],
                  decoder_input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(logits, want, atol=0.1, rtol=0)
    assert (logits.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_without_native_kernels_the_tokens_are_the_same(whisper, audio, monkeypatch):
    """The PyTorch path (cross-attention one sequence at a time over its slot's view) gives
    the kernel path's tokens, with several sequences decoding together."""
    params = SamplingParams(temperature=0, max_tokens=24)
    clips = [audio["sweep"], audio["speech"], audio["noise"]]
    with LLM(str(whisper)) as llm:
        want = [o.outputs[0].token_ids for o in llm.transcribe(
            clips, sampling_rate=16000, sampling_params=params)]
    monkeypatch.setenv("SHARDSERVE_KERNELS", "0")  # the workers read it when they start
    with LLM(str(whisper)) as llm:
        got = [o.outputs[0].token_ids for o in llm.transcribe(
            clips, sampling_rate=16000, sampling_params=params)]
    assert got == want


def test_preempted_sequences_are_encoded_again_and_finish_the_same(whisper, audio):
    """A cache too small for every sequence at once: the engine preempts some (their slots
    freed), brings them back (the audio encoded again) and each finishes with the tokens it
    gets with room to spare."""
    params = SamplingParams(temperature=0, max_tokens=120)
    clips = [audio["sweep"], audio["speech"], audio["noise"], audio["speech"]]
    with LLM(str(whisper)) as llm:
        want = [o.outputs[0].token_ids for o in llm.transcribe(
            clips, sampling_rate=16000, sampling_params=params)]
    with LLM(str(whisper), num_blocks=24, block_size=16) as llm:  # 384 tokens for 4 x 124
        outs = llm.transcribe(clips, sampling_rate=16000, sampling_params=params)
        preempted = llm.engine.scheduler.num_preemptions
    assert [o.outputs[0].token_ids for o in outs] == want
    assert preempted > 0


def test_language_is_detected_as_transformers_does(whisper, reference, audio, tmp_path):
    """No language given: the request's first generated token, from <|startoftranscript|>
    over its window and restricted to the language tokens, is transformers'
    ``detect_language``'s, in the request's one encoder pass; a copy of the checkpoint whose
    <|it|> embedding is made to outweigh the winner detects Italian."""
    from safetensors.numpy import load_file, save_file
    from transformers import WhisperForConditionalGeneration

    gen = json.loads((whisper / "generation_config.json").read_text())
    lang = {v: k.strip("<|>") for k, v in gen["lang_to_id"].items()}
    names = ["sweep", "noise", "speech"]
    feats = [torch.from_numpy(LogMel()(audio[n]))[None] for n in names]

    def detected(path, hf) -> tuple[list[int], list[int]]:
        with LLM(str(path)) as llm:
            outs = llm.transcribe([audio[n] for n in names], sampling_rate=16000,
                                  sampling_params=SamplingParams(temperature=0, max_tokens=4))
            # found in each request's own encoder pass
            assert llm.engine.executor.collective_rpc("stats")[0]["windows_encoded"] == 3
        assert all(len(o.outputs[0].token_ids) == 4 for o in outs)  # the forced ones left out
        with torch.no_grad():
            want = [int(hf.detect_language(f)[0]) for f in feats]
        return [o.prompt_token_ids[1] for o in outs], want

    got, want = detected(whisper, reference)
    assert got == want and all(t in lang for t in got)
    other = tmp_path / "italian"
    shutil.copytree(whisper, other)
    weights = load_file(other / "model.safetensors")
    emb = weights["model.decoder.embed_tokens.weight"]
    it, top = gen["lang_to_id"]["<|it|>"], want[0]
    emb[it] = 3 * emb[top]  # its logit 3x the winner's (the head is tied to the embedding)
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    hf = WhisperForConditionalGeneration.from_pretrained(str(other)).eval()
    got, want = detected(other, hf)
    assert got == want and lang[got[0]] == "it"


def test_long_audio_is_transcribed_window_by_window(whisper, reference, audio):
    """70 s of audio (speech, a long pause, speech, a pause, noise) is cut in the pauses
    into windows of at most 30 s; each window's tokens equal transformers' greedy generate
    on that window alone, joined in order."""
    talk, rng = audio["speech"], np.random.default_rng(2)
    x = np.concatenate([talk, np.zeros(16000 * 28, np.float32), talk,
                        np.zeros(16000 * 28, np.float32),
                        (0.05 * rng.standard_normal(16000 * 5)).astype(np.float32)])
    spans = split(x, 16000, 30.0)
    assert len(spans) == 3
    params = SamplingParams(temperature=0, max_tokens=20)
    with LLM(str(whisper), tensor_parallel_size=2) as llm:
        out = llm.transcribe(x, "en", sampling_rate=16000, sampling_params=params)[0]
        windows = llm.transcribe([x[a:b] for a, b in spans], "en", sampling_rate=16000,
                                 sampling_params=params)
        encoded = llm.engine.executor.collective_rpc("stats")[0]["windows_encoded"]
        found = llm.transcribe(x, sampling_rate=16000, sampling_params=params)[0]
        # the language found in the first window's own pass, and given to the others
        assert llm.engine.executor.collective_rpc("stats")[0]["windows_encoded"] == \
            encoded + 3
    prompt = out.prompt_token_ids
    want = [hf_greedy(reference, LogMel()(x[a:b]), prompt, 20) for a, b in spans]
    assert out.outputs[0].token_ids == [t for w in want for t in w]
    with torch.no_grad():
        language = int(reference.detect_language(torch.from_numpy(LogMel()(x[:spans[0][1]]))[
            None])[0])
    assert found.prompt_token_ids == [prompt[0], language, *prompt[2:]]
    assert found.outputs[0].token_ids == [
        t for a, b in spans for t in hf_greedy(reference, LogMel()(x[a:b]),
                                               found.prompt_token_ids, 20)]
    assert [w.outputs[0].token_ids for w in windows] == want
    assert out.outputs[0].text == " ".join(w.outputs[0].text.strip() for w in windows
                                           if w.outputs[0].text.strip())
