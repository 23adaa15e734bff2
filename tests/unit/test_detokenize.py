"""Incremental detokenization gives the same text as decoding the whole output at once, holds
back partly decoded characters while generation goes on, and finds stop strings that span
tokens."""

from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models

from shardserve import test_models
from shardserve.engine.core_messages import RequestDelta, SeqDelta
from shardserve.engine.llm_engine import LLMEngine
from shardserve.engine.request_state import OutputKind, RequestState
from shardserve.engine.sequence import Sequence
from shardserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    test_models.write_tokenizer(folder, 901)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def _metaspace() -> Tokenizer:
    """SentencePiece-style pieces: decoding drops the first piece's leading space, so a window
    decoded on its own differs from the same tokens decoded in context."""
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "▁Hello", "▁world", "!", "▁it",
                                         "'s", "▁me", "▁é", "t", "é"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(["</s>"])
    return tok


def _stream(tok, ids, **params):
    """Feed ``ids`` one token at a time as the engine does (matching stop strings on its own
    text, as the core does) and through a ``RequestState`` (as the API side does); return
    the texts the API side shows after each token, and the final one."""
    engine = SimpleNamespace(tokenizer=tok)
    sp = SamplingParams(**params)
    seq = Sequence("s", "r", 0, [1], sp, 0)
    state = RequestState("r", None, [1], sp, tok, OutputKind.CUMULATIVE)
    seen = []
    for t in ids:
        seq.output_token_ids.append(t)
        if params.get("stop"):
            LLMEngine._check_stop_strings(engine, seq)
        state.update(RequestDelta("r", [SeqDelta(0, [t], None, seq.finish_reason,
                                                 seq.stop_text_len)],
                                  seq.finish_reason is not None))
        if seq.finish_reason:
            break
        seen.append(state.output().outputs[0].text)
    if not state.finished:
        state.update(RequestDelta("r", [SeqDelta(0, [], None, "length")], True))
    return seen, state.output().outputs[0].text


TEXTS = ["The quick brown fox, naïve café — déjà vu ✓ 日本語 🙂 end.",
         "  leading spaces\nnew line\ttab ü",
         "🙂🙂🙂"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_matches_whole_decode(byte_bpe, text):
    enc = lambda t: byte_bpe.encode(t, add_special_tokens=False).ids  # noqa: E731
    ids = enc(text[:3]) + [2] + enc(text[3:])  # a special token (EOS) in the middle
    for skip in (True, False):
        want = byte_bpe.decode(ids, skip_special_tokens=skip)
        seen, final = _stream(byte_bpe, ids, skip_special_tokens=skip)
        assert final == want
        for i, partial in enumerate(seen):
            assert want.startswith(partial), (i, partial)
            assert "\ufffd" not in partial  # partial characters are held back
        assert seen[-1] == want  # the last token completes the text
        assert len(set(seen)) < len(seen)  # some token ended mid-character and waited


def test_metaspace_spaces_survive_windowed_decoding():
    tok = _metaspace()
    ids = [2, 3, 4, 5, 6, 7, 1, 8, 9]
    want = tok.decode(ids)
    seen, final = _stream(tok, ids)
    assert want.startswith("Hello world! it's me") and final == want
    assert all(want.startswith(p) for p in seen)


def test_stop_string_across_tokens(byte_bpe):
    text = "alpha beta gamma delta epsilon"
    ids = byte_bpe.encode(text, add_special_tokens=False).ids
    seen, final = _stream(byte_bpe, ids, stop=["ma del", "zzz"])
    assert final == "alpha beta gam"
