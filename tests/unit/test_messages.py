import msgpack
import numpy as np
import pytest

from shardserve.runtime.messages import NewRequest, StepInput, StepOutput, decode, encode


def test_step_roundtrip_keeps_types_and_buffers():
    step = StepInput(new_requests=[NewRequest("a", [1, 2, 3], 3, [4], 0, {"temperature": 0.0})],
                     cached_ids=["b"], cached_new_tokens=[[7]], cached_new_blocks=[[]],
                     req_ids=["a", "b"], num_tokens=[3, 1], finished_ids=["c"])
    back = decode(encode(step))
    assert back == step
    assert isinstance(back.new_requests[0], NewRequest)
    out = StepOutput(["a"], np.array([5]), np.ones(1, np.float32))
    back = decode(encode(out))
    np.testing.assert_array_equal(back.token_ids, out.token_ids)
    assert back.logprobs.dtype == np.float32 and back.top_ids is None


def test_unknown_message_type_is_refused():
    data = msgpack.packb({"__msg__": "os.system", "cmd": "true"})
    with pytest.raises(ValueError, match="unknown message type"):
        decode(data)


def test_object_arrays_cannot_be_sent_or_received():
    with pytest.raises(TypeError):
        encode(object())
    data = msgpack.packb(msgpack.ExtType(1, msgpack.packb(["|O", [1], b"\0" * 8])))
    with pytest.raises(ValueError):
        decode(data)


def test_engine_core_messages_roundtrip_and_a_pickle_is_refused():
    import pickle

    from shardserve.engine.core_messages import (
        AddRequest,
        CoreOutputs,
        Refusal,
        RequestDelta,
        SeqDelta,
    )

    add = AddRequest("r", [1, 2], {"n": 2, "stop": ["x"], "seed": None}, "hi", "acme")
    assert decode(encode(add)) == add
    out = CoreOutputs([RequestDelta("r", [SeqDelta(0, [5], [{5: -0.5, 7: -1.0}], "stop", 3)],
                                    True, 16)], [Refusal("q", "invalid", "bad", "max_tokens")],
                      acks=[1], pongs=[2], load=[1, 0, 0.25])
    back = decode(encode(out))
    assert back == out and back.outputs[0].seqs[0].logprobs == [{5: -0.5, 7: -1.0}]
    with pytest.raises(Exception):  # noqa: B017 - whatever msgpack says, it is not unpickled
        decode(pickle.dumps(add))
