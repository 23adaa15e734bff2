"""The consumer's side of the engine's deltas: each output kind shows what it promises, and
a stream never takes back text it has sent."""

from tokenizers import Tokenizer

from shardserve import SamplingParams, test_models
from shardserve.engine.core_messages import RequestDelta, SeqDelta
from shardserve.engine.request_state import OutputKind, RequestState
from shardserve.engine.tokenizer import TextTokenizer


def _tok(tmp_path):
    test_models.write_tokenizer(tmp_path, 901)
    return TextTokenizer(Tokenizer.from_file(str(tmp_path / "tokenizer.json")), {})


def _deltas(ids, stop_at=None):
    """One delta per token; a stop string matched at character ``stop_at`` ends it."""
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        yield RequestDelta("r", [SeqDelta(0, [t], None, ("stop" if stop_at is not None
                                                         else "length") if last else None,
                                          stop_at if last else None)], last)


def test_kinds_show_the_same_text_their_own_way(tmp_path):
    tok = _tok(tmp_path)
    ids = tok.encode("déjà vu, twice: déjà vu", add_special_tokens=False)
    want = tok.decode(ids)
    states = {k: RequestState("r", None, [1], SamplingParams(), tok, k) for k in OutputKind}
    seen = {k: [] for k in OutputKind}
    for d in _deltas(ids):
        for k, st in states.items():
            st.update(d)
            out = st.output()
            if out is not None:
                seen[k].append(out)
    assert len(seen[OutputKind.FINAL]) == 1 and seen[OutputKind.FINAL][0].outputs[0].text == want
    assert seen[OutputKind.CUMULATIVE][-1].outputs[0].text == want
    assert len(seen[OutputKind.CUMULATIVE]) == len(ids)
    delta = seen[OutputKind.DELTA]
    assert "".join(o.outputs[0].text for o in delta) == want
    assert sum(len(o.outputs[0].token_ids) for o in delta) == len(ids)
    assert [o.finished for o in delta].count(True) == 1 and delta[-1].finished


def test_a_stream_holds_back_a_possible_stop_string_and_never_takes_text_back(tmp_path):
    tok = _tok(tmp_path)
    text = "alpha beta gamma delta"
    ids = tok.encode(text, add_special_tokens=False)
    cut = text.index("ma del")
    # the core matched "ma del" once "delta"'s tokens came: the text ends before it
    upto = next(i for i in range(1, len(ids) + 1) if "ma del" in tok.decode(ids[:i]))
    state = RequestState("r", None, [1], SamplingParams(stop=["ma del"]), tok, OutputKind.DELTA)
    sent = ""
    for d in _deltas(ids[:upto], stop_at=cut):
        state.update(d)
        out = state.output()
        sent += "".join(c.text for c in out.outputs)
        assert text.startswith(sent)
    assert sent == "alpha beta gam"


def test_several_deltas_merge_into_one_output_when_the_consumer_is_behind(tmp_path):
    tok = _tok(tmp_path)
    ids = tok.encode("one two three", add_special_tokens=False)
    state = RequestState("r", None, [1], SamplingParams(logprobs=0), tok, OutputKind.DELTA)
    for t in ids[:-1]:
        state.update(RequestDelta("r", [SeqDelta(0, [t], [{t: -1.0}])]))
    out = state.output()
    assert out.outputs[0].token_ids == ids[:-1] and len(out.outputs[0].logprobs) == len(ids) - 1
    assert state.output() is None  # nothing new
