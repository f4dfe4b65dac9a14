import pytest
import torch

from plait.core.memory import ReqToTokenPool, TokenSlotAllocator


# ----- ReqToTokenPool -----


def test_req_to_token_table_is_int32_zeros_of_requested_shape():
    pool = ReqToTokenPool(4, 16)
    assert pool.req_to_token.shape == (4, 16)
    assert pool.req_to_token.dtype == torch.int32
    assert not pool.req_to_token.any()


def test_req_pool_hands_out_every_row_once_then_none():
    pool = ReqToTokenPool(3, 8)
    rows = [pool.alloc() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2]
    assert pool.alloc() is None
    assert pool.available_size() == 0
    pool.free(rows[1])
    assert pool.alloc() == rows[1]


def test_req_pool_free_rejects_double_free_and_out_of_range():
    pool = ReqToTokenPool(2, 8)
    idx = pool.alloc()
    pool.free(idx)
    with pytest.raises(ValueError, match="already free"):
        pool.free(idx)
    with pytest.raises(ValueError, match="out of range"):
        pool.free(2)
    with pytest.raises(ValueError, match="out of range"):
        pool.free(-1)


def test_req_pool_clear_frees_all_rows():
    pool = ReqToTokenPool(2, 8)
    pool.alloc(), pool.alloc()
    pool.clear()
    assert pool.available_size() == 2


# ----- TokenSlotAllocator -----


def test_allocator_rejects_num_slots_not_a_page_multiple():
    with pytest.raises(ValueError, match="num_slots"):
        TokenSlotAllocator(30, page_size=16)
    with pytest.raises(ValueError, match="num_slots"):
        TokenSlotAllocator(0)
    with pytest.raises(ValueError, match="page_size"):
        TokenSlotAllocator(16, page_size=0)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_padding_page_is_never_handed_out(page_size):
    alloc = TokenSlotAllocator(8 * page_size, page_size)
    slots = alloc.alloc(8 * page_size)
    assert slots is not None and slots.dtype == torch.int64
    assert int(slots.min()) == page_size
    assert int(slots.max()) == 9 * page_size - 1
    assert len(set(slots.tolist())) == 8 * page_size
    assert alloc.available_size() == 0


@pytest.mark.parametrize("page_size", [1, 16])
def test_alloc_free_round_trip_restores_capacity(page_size):
    alloc = TokenSlotAllocator(4 * page_size, page_size)
    a = alloc.alloc(page_size + 1)
    b = alloc.alloc(page_size)
    assert alloc.available_size() == page_size  # a took 2 pages (or 2 slots), b one
    assert not set(a.tolist()) & set(b.tolist())
    alloc.free(a)
    alloc.free(b)
    assert alloc.available_size() == 4 * page_size
    again = alloc.alloc(4 * page_size)
    assert sorted(again.tolist()) == list(range(page_size, 5 * page_size))


@pytest.mark.parametrize("page_size", [1, 16])
def test_alloc_returns_none_when_short_and_allocates_nothing(page_size):
    alloc = TokenSlotAllocator(2 * page_size, page_size)
    held = alloc.alloc(page_size)
    assert alloc.alloc(page_size + 1) is None
    assert alloc.available_size() == page_size
    assert alloc.alloc(page_size) is not None
    alloc.free(held)


def test_alloc_zero_gives_empty_int64_tensor():
    alloc = TokenSlotAllocator(16, 16)
    out = alloc.alloc(0)
    assert out.shape == (0,) and out.dtype == torch.int64
    assert alloc.available_size() == 16


def test_paged_continuation_fills_partial_page_before_taking_new_pages():
    alloc = TokenSlotAllocator(4 * 16, 16)
    first = alloc.alloc(5)  # tokens 0..4 of the request: page p, offsets 0..4
    page = int(first[0]) // 16
    assert first.tolist() == list(range(page * 16, page * 16 + 5))
    assert alloc.available_size() == 3 * 16

    more = alloc.alloc(20, last_slot=int(first[-1]))  # tokens 5..24
    assert more[:11].tolist() == list(range(page * 16 + 5, page * 16 + 16))
    new_page = int(more[11]) // 16
    assert new_page != page
    assert more[11:].tolist() == list(range(new_page * 16, new_page * 16 + 9))
    assert alloc.available_size() == 2 * 16

    # Decode one token at a time inside the page: no new page taken.
    nxt = alloc.alloc(1, last_slot=int(more[-1]))
    assert nxt.tolist() == [new_page * 16 + 9]
    assert alloc.available_size() == 2 * 16


def test_paged_continuation_from_page_end_takes_a_fresh_page():
    alloc = TokenSlotAllocator(2 * 16, 16)
    first = alloc.alloc(16)
    nxt = alloc.alloc(1, last_slot=int(first[-1]))
    assert int(nxt[0]) % 16 == 0 and int(nxt[0]) // 16 != int(first[0]) // 16


def test_paged_continuation_that_fits_in_partial_page_succeeds_when_pool_is_full():
    alloc = TokenSlotAllocator(16, 16)
    first = alloc.alloc(3)
    assert alloc.available_size() == 0
    assert alloc.alloc(13, last_slot=int(first[-1])).tolist() == list(range(19, 32))
    assert alloc.alloc(14, last_slot=int(first[-1])) is None


def test_continuation_from_a_free_page_is_rejected():
    alloc = TokenSlotAllocator(2 * 16, 16)
    with pytest.raises(ValueError, match="last_slot"):
        alloc.alloc(1, last_slot=20)


@pytest.mark.parametrize("page_size", [1, 16])
def test_double_free_raises(page_size):
    alloc = TokenSlotAllocator(4 * page_size, page_size)
    slots = alloc.alloc(page_size)
    alloc.free(slots)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(slots)
    assert alloc.available_size() == 4 * page_size


def test_freeing_the_padding_page_raises():
    alloc = TokenSlotAllocator(4)
    alloc.alloc(4)
    with pytest.raises(ValueError, match="outside"):
        alloc.free(torch.tensor([0]))
    with pytest.raises(ValueError, match="outside"):
        alloc.free(torch.tensor([5]))


def test_free_of_partial_page_slots_frees_the_whole_page():
    alloc = TokenSlotAllocator(2 * 16, 16)
    slots = alloc.alloc(3)
    alloc.free(slots)
    assert alloc.available_size() == 2 * 16


def test_clear_makes_everything_free():
    alloc = TokenSlotAllocator(8, 2)
    alloc.alloc(6)
    alloc.clear()
    assert alloc.available_size() == 8
    assert alloc.alloc(8) is not None
