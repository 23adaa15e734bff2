import msgpack
import numpy as np
import pytest

from shardserve.runtime.messages import NewRequest, StepInput, StepOutput, decode, encode


def test_step_roundtrip_keeps_types_and_buffers():
    step = StepInput(new_requests=[NewRequest("a", [1, 2, 3], {"temperature": 0.0})],
                     decode_ids=["b"], decode_tokens=np.array([7], dtype=np.int64),
                     finished_ids=["c"])
    back = decode(encode(step))
    assert isinstance(back, StepInput) and isinstance(back.new_requests[0], NewRequest)
    assert back.new_requests[0].token_ids == [1, 2, 3]
    np.testing.assert_array_equal(back.decode_tokens, step.decode_tokens)
    out = StepOutput(["a"], np.array([5]), np.ones((1, 3), np.float32))
    assert decode(encode(out)).logits.dtype == np.float32


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
