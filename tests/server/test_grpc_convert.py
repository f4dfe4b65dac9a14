"""SGLang's scheduler protocol <-> Plait's core messages, without a server."""

from __future__ import annotations

import grpc
import pytest
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from plait.server.grpc import convert
from plait.server.protocol import APIError


def request(**kw) -> pb.GenerateRequest:
    kw.setdefault("tokenized", pb.TokenizedInput(input_ids=[5, 6, 7]))
    kw.setdefault("sampling_params", pb.SamplingParams(temperature=0.5, max_new_tokens=4))
    return pb.GenerateRequest(request_id="r1", **kw)


def test_proto_zeros_mean_the_neutral_values_and_set_fields_carry_over():
    msg = convert.generate_req(request())
    sp = msg.sampling_params
    assert (sp.top_p, sp.top_k, sp.repetition_penalty, sp.n) == (1.0, -1, 1.0, 1)
    assert sp.temperature == 0.5 and sp.max_new_tokens == 4
    assert msg.input_ids == [5, 6, 7] and msg.rid == "r1" and msg.logprob_start_len == -1
    full = convert.sampling_params(
        pb.SamplingParams(
            temperature=0,
            top_k=3,
            stop=["\n"],
            stop_token_ids=[2],
            regex="a+",
            logit_bias={"5": -100.0},
        )
    )
    assert full["top_k"] == 3 and full["stop"] == ["\n"] and full["stop_token_ids"] == [2]
    assert full["regex"] == "a+" and full["logit_bias"] == {"5": -100.0}
    assert "max_new_tokens" not in full  # unset: the core's default, not 0


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"return_hidden_states": True}, "return_hidden_states"),
        ({"lora_id": "a"}, "lora_id"),
        ({"token_ids_logprob": [1]}, "token_ids_logprob"),
        ({"data_parallel_rank": 1}, "data_parallel_rank"),
        ({"mm_inputs": pb.MultimodalInputs(image_urls=["x"])}, "mm_inputs"),
        ({"sampling_params": pb.SamplingParams(structural_tag="{}")}, "structural_tag"),
        ({"tokenized": pb.TokenizedInput(input_ids=[])}, "input_ids"),
    ],
)
def test_what_a_plait_worker_cannot_honour_is_refused_by_name(kw, field):
    with pytest.raises(APIError) as e:
        convert.generate_req(request(**kw))
    assert field in e.value.param and e.value.status == 400
    assert convert.status_code(e.value) == grpc.StatusCode.INVALID_ARGUMENT


def test_rank_zero_and_bootstrap_fields_are_accepted():
    msg = convert.generate_req(
        request(
            data_parallel_rank=0,
            disaggregated_params=pb.DisaggregatedParams(
                bootstrap_host="h", bootstrap_port=8998, bootstrap_room=0
            ),
        )
    )
    assert (msg.bootstrap.host, msg.bootstrap.port, msg.bootstrap.room) == ("h", 8998, 0)


def test_status_codes_follow_the_http_status():
    assert convert.status_code(APIError("x", status=429)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert convert.status_code(APIError("x", status=503)) == grpc.StatusCode.UNAVAILABLE
    assert convert.status_code(APIError("x", status=500)) == grpc.StatusCode.INTERNAL
    assert convert.error_message(APIError("bad", param="top_k")) == "top_k: bad"
    assert convert.error_message(APIError("top_k must be", param="top_k")) == "top_k must be"


def test_stream_chunks_carry_new_tokens_and_complete_the_finish():
    meta = {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "cached_tokens": 1,
        "finish_reason": {"type": "stop", "matched": 2},
        "output_token_logprobs": [(-0.1, 9, None), (-0.2, 8, None), (-0.3, 2, None)],
        "output_top_logprobs": [None, None, None],
    }
    out = {"output_ids": [9, 8, 2], "meta_info": meta}
    c = convert.chunk("r", out, 1, 0).chunk
    assert list(c.token_ids) == [8, 2] and c.completion_tokens == 3 and c.cached_tokens == 1
    assert list(c.output_logprobs.token_ids) == [8, 2]
    done = convert.complete("r", out, 0, 1).complete
    assert list(done.output_ids) == [9, 8, 2] and done.index == 1
    assert done.finish_reason == "stop" and done.matched_token_id == 2
    length = convert.complete("r", {"output_ids": [1], "meta_info": {"finish_reason": {
        "type": "length"}}}, 0, 0).complete  # fmt: skip
    assert length.finish_reason == "length" and not length.HasField("matched_token_id")
    text_stop = {"finish_reason": {"type": "stop", "matched": "\n"}}
    assert (
        convert.complete("r", {"output_ids": [], "meta_info": text_stop}, 0, 0).complete
    ).matched_stop_str == "\n"
