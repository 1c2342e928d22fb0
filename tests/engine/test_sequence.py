import pytest

from lmforge.engine.sequence import Sequence, SequenceStatus
from lmforge.errors import InputError
from lmforge.generation.sampling_params import SamplingParams


def test_tokens_and_block_geometry():
    seq = Sequence(range(10), SamplingParams(max_tokens=4), request_id="r1")
    assert (seq.request_id, seq.status, seq.params.max_tokens) == ("r1", SequenceStatus.WAITING, 4)
    assert seq.num_tokens == len(seq) == 10 and seq.num_output_tokens == 0
    assert seq.num_blocks(4) == 3 and seq.last_block_num_tokens(4) == 2
    assert seq.block_tokens(0, 4) == (0, 1, 2, 3) and seq.block_tokens(2, 4) == (8, 9)
    seq.append_token(42)
    seq.append_token(43)
    assert seq.prompt_token_ids == list(range(10)) and seq.output_token_ids == [42, 43]
    assert seq.last_token == 43 and seq.num_blocks(4) == 3 and seq.last_block_num_tokens(4) == 4
    seq.append_token(44)
    assert seq.num_blocks(4) == 4 and seq.last_block_num_tokens(4) == 1


def test_status_and_finish_reason():
    seq = Sequence([1])
    assert not seq.is_finished and seq.finish_reason is None
    for status, reason in [(SequenceStatus.FINISHED_STOPPED, "stop"),
                           (SequenceStatus.FINISHED_LENGTH_CAPPED, "length"),
                           (SequenceStatus.FINISHED_ABORTED, "abort")]:
        seq.status = status
        assert seq.is_finished and seq.finish_reason == reason
    seq.status = SequenceStatus.PREEMPTED
    assert not seq.is_finished


def test_fork_copies_tokens_not_blocks():
    parent = Sequence([1, 2, 3], request_id="req")
    parent.append_token(4)
    parent.block_table = [7]
    child = parent.fork()
    assert child.seq_id != parent.seq_id and child.request_id == "req"
    assert child.prompt_token_ids == [1, 2, 3] and child.output_token_ids == [4]
    assert child.block_table == [] and child.params is parent.params
    child.append_token(5)
    assert parent.token_ids == [1, 2, 3, 4]


def test_unique_ids_and_default_request_id():
    a, b = Sequence([1]), Sequence([1])
    assert a.seq_id != b.seq_id and a.request_id == str(a.seq_id)


def test_empty_prompt_is_rejected():
    with pytest.raises(InputError, match="no tokens"):
        Sequence([])
