"""A Whisper served beside an encoder and an LM: OpenAI's audio endpoints through the official
`openai` client (every response format; the tokens equal the offline engine's), KServe v2
through tritonclient, bad files answered 400/413/415 with the model serving on, and the
`assistant` pipeline (audio -> transcript -> intent -> answer) answering with every stage's
output."""

import io
import json
import urllib.request
import wave

import numpy as np
import pytest

from shardserve import LLM, test_models
from shardserve.audio import decode_wav, resample
from tests.distributed.test_whisper import speech
from tests.e2e.test_server import _free_port, _start, _stop
from tests.unit.test_audio import sweep, wav_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("speech")
    whisper = test_models.write(repo / "w", "whisper", "tiny")
    llama = test_models.write(repo / "l", "llama", "tiny")
    for name, yaml in (
            ("whisper", f"kind: speech\nweights: {whisper}\ntp: 2\nmax_num_seqs: 4\n"),
            ("lm", f"weights: {llama}\nmax_num_seqs: 4\n"),
            ("all-minilm-l6-v2", f"kind: encoder\nweights: {test_models.minilm_folder()}\n")):
        (repo / name).mkdir()
        (repo / name / "model.yaml").write_text(yaml)
    (repo / "assistant").mkdir()
    (repo / "assistant" / "pipeline.yaml").write_text(
        test_models.ASSISTANT_PIPELINE.replace("whisper-tiny-random", "whisper")
        .replace("demo-llama-random", "lm"))
    port = _free_port()
    proc = _start(["--repository", str(repo), "--devices", "cpu:2",
                   "--max-audio-bytes", str(3 << 20), "--max-audio-seconds", "90"], port)
    yield port, whisper, tmp_path_factory.mktemp("audio")
    code = _stop(proc)
    assert code == 0, proc.stdout.read()[-3000:]


def _client(port):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                         max_retries=0)


def test_openai_client_transcribes_in_every_format(server):
    port, whisper, tmp = server
    wav = speech("the quick brown fox jumps over the lazy dog", tmp)
    client = _client(port)
    plain = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav))
    text = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav),
                                              response_format="text")
    verbose = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav),
                                                 response_format="verbose_json")
    english = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav),
                                                 response_format="verbose_json", language="en")
    with LLM(str(whisper), tensor_parallel_size=2) as llm:
        found = llm.transcribe(wav)[0]  # no language: detected, as the server does
        offline = found.outputs[0]
        given = llm.transcribe(wav, "en")[0].outputs[0]
        detected = llm.tokenizer.decode([found.prompt_token_ids[1]], skip_special_tokens=False)
    assert plain.text == offline.text.strip() and plain.text
    assert text.strip() == plain.text
    assert verbose.segments[0].tokens == offline.token_ids
    seconds = len(decode(wav)) / 22050
    assert abs(verbose.duration - seconds) < 1e-2
    assert verbose.language == detected.strip("<|>") and english.language == "en"
    assert english.segments[0].tokens == given.token_ids
    srt = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav),
                                             response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> ") and plain.text in srt
    translated = client.audio.translations.create(model="whisper", file=("a.wav", wav))
    assert isinstance(translated.text, str)


def decode(wav: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(wav)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def test_bad_files_are_refused_and_the_model_keeps_serving(server):
    import openai

    port, _, _ = server
    client = _client(port)
    cases = [(b"ID3" + bytes(200), 400, "MP3 file; accepted: WAV"),
             (b"", 400, "empty"),
             (wav_bytes(sweep(91.0), 16000), 400, "at most 90 s a request"),
             (wav_bytes(sweep(30.0, 48000), 48000, 2, 2), 413, "over")]  # 5.8 MB
    for data, status, message in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.audio.transcriptions.create(model="whisper", file=("x.wav", data))
        assert e.value.status_code == status and message in str(e.value), e.value
    with pytest.raises(openai.BadRequestError, match="language 'xx'"):
        client.audio.transcriptions.create(model="whisper", file=("a.wav", wav_bytes(
            sweep(1.0), 16000)), language="xx")
    with pytest.raises(openai.BadRequestError, match="speech model"):
        client.audio.transcriptions.create(model="lm", file=("a.wav", wav_bytes(
            sweep(1.0), 16000)))
    with pytest.raises(openai.BadRequestError, match="use /v1/audio/transcriptions"):
        client.completions.create(model="whisper", prompt="hello")
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"language\"; "
            f"filename=\"l.txt\"\r\n\r\nen\r\n--{boundary}\r\nContent-Disposition: "
            f"form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n").encode() + \
        wav_bytes(sweep(1.0), 16000) + f"\r\n--{boundary}--\r\n".encode()
    odd = urllib.request.Request(f"http://127.0.0.1:{port}/v1/audio/transcriptions", body,
                                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as e:  # a second file, where text belongs
        urllib.request.urlopen(odd)
    assert e.value.code == 400 and b"Maximum number of files is 1" in e.value.read()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/audio/transcriptions",
                                 b'{"model": "whisper"}',
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 415
    ok = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav_bytes(
        sweep(2.0, 8000), 8000)))
    assert isinstance(ok.text, str)


def test_long_audio_is_transcribed_in_windows_each_a_segment(server):
    """72 s of speech and pauses: three windows, cut in the pauses, each a segment of
    verbose_json and a cue of srt / vtt; the tokens equal the offline engine's."""
    port, whisper, tmp = server
    talk, rate = decode_wav(speech("set an alarm for seven in the morning", tmp))
    talk, rate = resample(talk, rate, 16000), 16000  # 2.3 MB: under this server's 3 MiB
    pause = np.zeros(rate * 27, np.float32)
    x = np.concatenate([talk, pause, talk, pause, talk, pause[:rate * 10]])
    wav = wav_bytes(x, rate)
    client = _client(port)
    verbose = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav),
                                                 response_format="verbose_json", language="en")
    vtt = client.audio.transcriptions.create(model="whisper", file=("a.wav", wav),
                                             response_format="vtt", language="en")
    with LLM(str(whisper), tensor_parallel_size=2) as llm:
        offline = llm.transcribe(wav, "en")[0].outputs[0]
    segs = verbose.segments
    assert len(segs) == 3 and segs[0].start == 0 and abs(segs[-1].end - len(x) / rate) < 1e-2
    assert all(a.end == b.start for a, b in zip(segs, segs[1:], strict=False))
    assert all(s.end - s.start <= 30 for s in segs)
    assert [s.seek for s in segs] == [round(s.start * 100) for s in segs]  # log-mel frames
    # each cut falls in a pause, after the talk that precedes it
    talked = len(talk) / rate
    assert segs[0].end > talked and segs[1].end > segs[0].end + talked
    assert [t for s in segs for t in s.tokens] == offline.token_ids
    assert verbose.text == " ".join(s.text for s in segs if s.text)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and vtt.count(" --> ") == 3


def test_kserve_v2_transcribes_a_batch_through_tritonclient(server):
    import tritonclient.http as http

    port, whisper, _ = server
    client = http.InferenceServerClient(f"127.0.0.1:{port}")
    meta = client.get_model_metadata("whisper")
    assert meta["platform"] == "shardserve_speech"
    audio = np.stack([sweep(2.0, 8000), 0.5 * sweep(2.0, 8000, 300.0, 900.0)])
    inp = http.InferInput("audio", list(audio.shape), "FP32")
    inp.set_data_from_numpy(audio, binary_data=True)
    res = client.infer("whisper", [inp], parameters={"sample_rate": 8000})
    texts = [t.decode() for t in res.as_numpy("text")]
    with LLM(str(whisper), tensor_parallel_size=2) as llm:
        want = [o.outputs[0].text.strip() for o in llm.transcribe(list(audio),
                                                                  sampling_rate=8000)]
    assert texts == want


def test_the_assistant_pipeline_answers_with_every_stage(server):
    import tritonclient.http as http

    port, _, tmp = server
    wav = speech("will it rain tomorrow", tmp)
    samples = decode(wav).astype(np.float32) / 32768
    client = http.InferenceServerClient(f"127.0.0.1:{port}")
    meta = client.get_model_metadata("assistant")
    assert [i["name"] for i in meta["inputs"]] == ["audio"]
    inp = http.InferInput("audio", [len(samples)], "FP32")
    inp.set_data_from_numpy(samples, binary_data=True)
    res = client.infer("assistant", [inp], parameters={"sample_rate": 22050})
    out = {o["name"]: res.as_numpy(o["name"])[0].decode()
           for o in res.get_response()["outputs"]}
    assert set(out) == {"text_output", "heard", "intent", "answer"}
    assert out["intent"] in ("weather", "greeting", "time")
    assert out["text_output"] == out["answer"]
    index = {row["name"]: row for row in json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{port}/v2/repository/index").read())}
    # the voice assistant's three models side by side, placed on the machine's devices
    assert {"whisper", "lm", "all-minilm-l6-v2"} <= set(index)
    assert all(row["state"] == "READY" and row["replicas"][0]["devices"]
               for row in index.values())
    assert len(index["whisper"]["replicas"][0]["devices"]) == 2  # tp: 2
