"""The wire protocol module (`clients.protocol`) and the codec's array encodings, without Ray: fast unit tests."""

from __future__ import annotations

import json

import msgpack
import msgpack_numpy
import numpy as np
import pytest
from pydantic import ValidationError

from clients import ModalityConfig, packb
from clients.codec import unpackb_with_encoding
from clients.protocol import (
    ERROR_KINDS,
    ArrayEncoding,
    ErrorKind,
    ObservationForm,
    PortProtocol,
    Refusal,
    RequestError,
    build_request,
    canonical_tag,
    error_reply,
    format_action_reply,
    modality_config_n15,
    parse_action_request,
    reply_error,
    to_flat,
    to_nested,
)
from serving.config import FleetArgs


def _nested(b: int = 2) -> dict:
    rng = np.random.default_rng(0)
    return {
        "video": {"ego": rng.integers(0, 256, (b, 1, 4, 4, 3), dtype=np.uint8)},
        "state": {"arm": rng.standard_normal((b, 1, 7)).astype(np.float32)},
        "language": {"annotation.human.task_description": [["pick"]] * b},
    }


def test_error_kinds_and_replies():
    assert ERROR_KINDS == ("bad_request", "unauthorized", "overloaded", "deadline", "policy", "refused", "internal")
    assert error_reply("no", ErrorKind.REFUSED) == {"error": "no", "kind": "refused"}
    assert RequestError("x", "overloaded").kind is ErrorKind.OVERLOADED
    assert RequestError("x").kind is ErrorKind.BAD_REQUEST
    with pytest.raises(ValueError):
        RequestError("x", "bogus")
    assert reply_error({"error": "boom", "kind": "policy"}) == ("boom", "policy")
    assert reply_error({"error": "Unauthorized: Invalid API token"}) == ("Unauthorized: Invalid API token", None)
    assert reply_error([{"a": 1}, {}]) is None


def test_a_valid_request_that_got_no_action_says_why_in_a_reason_machines_read():
    error = RequestError("deadline: refused early, predicted 90 ms ...", ErrorKind.DEADLINE, Refusal.REFUSED_EARLY)
    assert error_reply(str(error), error.kind, error.reason) == {
        "error": "deadline: refused early, predicted 90 ms ...", "kind": "deadline", "reason": "refused_early"}
    assert "reason" not in error_reply("boom", ErrorKind.POLICY)  # a fault, not a refusal: kind alone
    assert RequestError("x").reason is None
    assert [r.value for r in Refusal] == ["overloaded", "refused_early", "expired_waiting", "expired_on_replica"]


def test_slo_metrics_count_by_the_reason_not_the_message():
    from serving.metrics import SLO_OUTCOMES, slo_outcome

    def err(reason):
        return RequestError("words for people, whatever they say", ErrorKind.DEADLINE, reason)

    assert slo_outcome("ok", None) == "on_time"
    assert slo_outcome("deadline", err(Refusal.REFUSED_EARLY)) == "refused_early"
    assert slo_outcome("deadline", err(Refusal.EXPIRED_WAITING)) == "expired"
    assert slo_outcome("deadline", err(Refusal.EXPIRED_ON_REPLICA)) == "expired"
    assert slo_outcome("overloaded", err(Refusal.OVERLOADED)) == "error"
    assert slo_outcome("policy", err(None)) == slo_outcome("internal", None) == "error"
    assert {slo_outcome("ok", None), "refused_early", "expired", "error"} == set(SLO_OUTCOMES)


def test_canonical_tag_is_the_one_rule_for_config_router_and_policy():
    from policy.embodiment import EmbodimentTag, resolve_tag

    for spelling in ("gr1", "GR1", "EmbodimentTag.GR1", " Gr1 ", EmbodimentTag.GR1):
        assert canonical_tag(spelling) == "gr1" == resolve_tag(spelling)
    with pytest.raises(ValueError, match="embodiment tag"):
        canonical_tag("no spaces allowed")
    args = FleetArgs.model_validate({"embodiments": {"GR1": {"demo_preset": "tiny"}},
                                     "ingress": {"ports": [{"port": 5555, "embodiment": "EmbodimentTag.GR1"}]}})
    assert list(args.embodiments) == ["gr1"] and args.ingress.ports[0].embodiment == "gr1"


def test_build_request_keys_as_upstream():
    assert build_request("ping", requires_input=False) == {"endpoint": "ping"}
    assert build_request("reset", {"options": None}, api_token="t") == {"endpoint": "reset", "data": {"options": None},
                                                                         "api_token": "t"}
    assert build_request("get_action", {}, embodiment_tag="gr1")["embodiment_tag"] == "gr1"


def test_flat_and_nested_round_trip():
    nested = _nested(2)
    flat = to_flat(nested)
    assert set(flat) == {"video.ego", "state.arm", "annotation.human.task_description"}
    assert flat["annotation.human.task_description"] == ["pick", "pick"]
    back = to_nested(flat)
    assert back["language"] == nested["language"]
    assert back["state"]["arm"] is nested["state"]["arm"]
    req = parse_action_request({"observation": flat, "options": {"seed": 1}})
    assert req.form is ObservationForm.FLAT and req.samples == 2 and req.options == {"seed": 1}
    reply = format_action_reply(req, {"arm": np.zeros((2, 16, 7), np.float32)}, {"k": 1})
    assert isinstance(reply, list) and set(reply[0]) == {"action.arm"} and reply[1] == {"k": 1}


def test_n15_unbatched_float64_is_cast_and_reply_squeezed_as_upstream():
    obs = {"video.ego": np.zeros((1, 4, 4, 3), np.uint8), "state.arm": np.zeros((1, 7), np.float64),
           "annotation.human.action.task_description": ["pick"]}
    for protocol in (PortProtocol.N15, PortProtocol.AUTO):
        req = parse_action_request(dict(obs), protocol)
        assert req.form is ObservationForm.N15 and req.unbatched and req.samples == 1
        assert req.observation["state"]["arm"].dtype == np.float32
        assert req.observation["state"]["arm"].shape == (1, 1, 7)
        assert req.observation["video"]["ego"].shape == (1, 1, 4, 4, 3)
        assert req.observation["language"]["annotation.human.action.task_description"] == [["pick"]]
    action = {"arm": np.zeros((1, 16, 7), np.float32), "height": np.zeros((1, 16, 1), np.float32)}
    reply = format_action_reply(req, action, {"ignored": True})
    # N1.5's server squeezed every size-1 axis of an unbatched reply (np.squeeze), D=1 included.
    assert reply["action.arm"].shape == (16, 7) and reply["action.height"].shape == (16,)
    batched = {"video.ego": np.zeros((2, 1, 4, 4, 3), np.uint8), "state.arm": np.zeros((2, 1, 7), np.float32),
               "annotation.human.action.task_description": ["a", "b"]}
    req = parse_action_request(batched, PortProtocol.N15)
    assert not req.unbatched and req.samples == 2


def test_n15_port_refuses_the_n16_envelope_naming_the_form():
    with pytest.raises(RequestError, match="this port speaks N1.5"):
        parse_action_request({"observation": _nested(1), "options": None}, PortProtocol.N15)


def test_modality_config_n15_is_a_json_string_of_n15_fields():
    cfg = ModalityConfig(delta_indices=[0], modality_keys=["ego"])
    wire = modality_config_n15({"video": cfg})
    assert wire["video"]["__ModalityConfig_class__"] is True
    assert json.loads(wire["video"]["as_json"]) == {"delta_indices": [0], "modality_keys": ["ego"]}


def test_port_protocol_config_error_names_field_and_choices():
    with pytest.raises(ValidationError) as err:
        FleetArgs.model_validate({"embodiments": {"gr1": {"demo_preset": "tiny"}},
                                  "ingress": {"ports": [{"port": 5555, "embodiment": "gr1", "protocol": "n1.4"}]}})
    text = str(err.value)
    assert "ingress.ports.0.protocol" in text and "'auto'" in text and "'n1.5'" in text and "n1.4" in text
    ok = FleetArgs.model_validate({"embodiments": {"gr1": {"demo_preset": "tiny"}},
                                   "ingress": {"ports": [{"port": 5555, "embodiment": "gr1", "protocol": "n1.5"}]}})
    assert ok.ingress.ports[0].port_protocol is PortProtocol.N15


def test_msgpack_numpy_encoding_is_byte_identical_to_the_package():
    arrays = {"c": np.arange(12, dtype=np.float32).reshape(3, 4), "f": np.asfortranarray(np.ones((2, 3), ">f8")),
              "u": np.zeros((1, 2, 2, 3), np.uint8), "b": np.array([True, False])}
    mine = packb(arrays, ArrayEncoding.MSGPACK_NUMPY)
    assert mine == msgpack.packb(arrays, default=msgpack_numpy.encode)
    back = msgpack.unpackb(mine, object_hook=msgpack_numpy.decode, raw=False)
    for key, arr in arrays.items():
        np.testing.assert_array_equal(back[key], arr)
        assert back[key].dtype == arr.dtype


def test_decode_reports_the_array_encoding():
    arr = np.ones((1, 2), np.float32)
    assert unpackb_with_encoding(packb({"a": arr}))[1] is ArrayEncoding.NPY
    assert unpackb_with_encoding(packb({"a": arr}, "msgpack-numpy"))[1] is ArrayEncoding.MSGPACK_NUMPY
    assert unpackb_with_encoding(msgpack.packb({"a": arr}, default=msgpack_numpy.encode))[1] is ArrayEncoding.MSGPACK_NUMPY
    assert unpackb_with_encoding(packb({"endpoint": "ping"}))[1] is None
    # A message mixing both: a client that writes msgpack-numpy arrays may read nothing else, so that one wins.
    npy_part = msgpack.unpackb(packb({"a": arr}), raw=False)["a"]
    mixed = msgpack.packb({"a": npy_part, "b": arr}, default=msgpack_numpy.encode)
    assert unpackb_with_encoding(mixed)[1] is ArrayEncoding.MSGPACK_NUMPY


@pytest.mark.parametrize("encoding", list(ArrayEncoding))
def test_numpy_scalars_in_info_travel_as_plain_numbers_in_both_encodings(encoding):
    info = {"f32": np.float32(1.5), "i64": np.int64(7), "b": np.bool_(True), "c": np.complex64(1 + 2j)}
    raw = msgpack.unpackb(packb(info, encoding), raw=False, strict_map_key=False)
    assert raw["f32"] == 1.5 and type(raw["f32"]) is float
    assert raw["i64"] == 7 and type(raw["i64"]) is int
    assert raw["b"] is True
    back = unpackb_with_encoding(packb(info, encoding))[0]
    assert back["c"] == np.complex64(1 + 2j) and back["c"].shape == ()  # complex: a 0-d array (msgpack has none)
    if encoding is ArrayEncoding.MSGPACK_NUMPY:
        decoded = msgpack.unpackb(packb(info, encoding), object_hook=msgpack_numpy.decode, raw=False)
        assert decoded["f32"] == 1.5 and decoded["c"] == 1 + 2j
