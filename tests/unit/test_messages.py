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
