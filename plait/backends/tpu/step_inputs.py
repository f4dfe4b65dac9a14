"""The host side of a jitted step: padded int32 numpy arrays, one dict per step.

Built from the scheduler's view (requests, their ``req_to_token`` rows, new slots) to the exact
shapes of a :class:`~plait.backends.tpu.graph.JitBuckets` bucket. Keys and shapes (T tokens,
B requests, W kv width, R logit rows, NT extend tiles, all padded):

=============  ========  ===============================================================
input_ids      [T]       token ids (padding: 0)
positions      [T]       absolute positions (padding: 0)
out_loc        [T]       KV slot each new token writes (padding: slot 0, reserved)
token_req      [T]       which request row a token belongs to (padding: 0)
slot_table     [B, W]    slot of request b's token w; 0 at or past ``seq_lens[b]``
seq_lens       [B]       tokens per request after this step (padding requests: 1)
logit_rows     [R]       token rows whose logits come back (padding: 0)
tile_req       [NT]      extend only: the request of each Q_TILE-token tile (Pallas path)
tile_pos0      [NT]      position of a tile's first token (padding tiles: -Q_TILE)
q_index        [NT, QT]  token row of each tile entry (padding: T, a zero row)
out_index      [T]       row of each token in the flattened tiles (padding: 0)
=============  ========  ===============================================================

Padding is harmless by construction: padding tokens write only slot 0 and see request 0's
first token; padding requests see slot 0 alone; their outputs are dropped by the runner.
"""

from __future__ import annotations

import numpy as np

Q_TILE = 16  # must equal pallas_attention.Q_TILE (checked in the tests)


def slot_table(
    req_to_token: np.ndarray, rows: list[int], seq_lens: list[int], batch: int, width: int
) -> np.ndarray:
    """[batch, width] slots of each request's first ``seq_lens[b]`` tokens, 0 elsewhere."""
    table = np.zeros((batch, width), np.int32)
    for b, (row, n) in enumerate(zip(rows, seq_lens)):
        table[b, :n] = req_to_token[row, :n]
    return table


def _padded(values: list[int], n: int, pad: int = 0) -> np.ndarray:
    out = np.full(n, pad, np.int32)
    out[: len(values)] = values
    return out


def decode_inputs(
    req_to_token: np.ndarray,
    rows: list[int],
    positions: list[int],
    input_ids: list[int],
    slots: list[int],
    batch: int,
    width: int,
) -> dict:
    """One new token per request at ``positions[b]`` (its seq_len is position + 1)."""
    seq = [p + 1 for p in positions]
    return {
        "input_ids": _padded(input_ids, batch),
        "positions": _padded(positions, batch),
        "out_loc": _padded(slots, batch),
        "token_req": np.arange(batch, dtype=np.int32),
        "slot_table": slot_table(req_to_token, rows, seq, batch, width),
        "seq_lens": _padded(seq, batch, pad=1),
        "logit_rows": np.arange(batch, dtype=np.int32),
    }


def extend_inputs(
    req_to_token: np.ndarray,
    rows: list[int],
    starts: list[int],
    lengths: list[int],
    input_ids: list[int],
    slots: list[int],
    logit_rows: list[int],
    tokens: int,
    batch: int,
    width: int,
    num_logit_rows: int,
) -> dict:
    """Request b's tokens ``starts[b] .. starts[b] + lengths[b] - 1``, concatenated."""
    seq = [s + n for s, n in zip(starts, lengths)]
    positions = [p for s, n in zip(starts, lengths) for p in range(s, s + n)]
    token_req = [b for b, n in enumerate(lengths) for _ in range(n)]
    tiles = extend_tiles(starts, lengths, tokens // Q_TILE + batch, tokens)
    return {
        "input_ids": _padded(input_ids, tokens),
        "positions": _padded(positions, tokens),
        "out_loc": _padded(slots, tokens),
        "token_req": _padded(token_req, tokens),
        "slot_table": slot_table(req_to_token, rows, seq, batch, width),
        "seq_lens": _padded(seq, batch, pad=1),
        "logit_rows": _padded(logit_rows, num_logit_rows),
        **tiles,
    }


def extend_tiles(
    starts: list[int], lengths: list[int], num_tiles: int, tokens: int
) -> dict[str, np.ndarray]:
    """Cut each request's new tokens into Q_TILE-row tiles, padded to ``num_tiles`` tiles;
    ``tokens`` (>= the real token count) is the padding row of ``q_index`` and the length of
    ``out_index``. ValueError if the tiles do not fit."""
    tile_req, tile_pos0, q_index, out_index = [], [], [], []
    first_row = 0
    for b, (start, n) in enumerate(zip(starts, lengths)):
        for first in range(0, n, Q_TILE):
            m = min(Q_TILE, n - first)
            out_index.extend(len(tile_req) * Q_TILE + r for r in range(m))
            q_index.append([first_row + first + r for r in range(m)] + [tokens] * (Q_TILE - m))
            tile_req.append(b)
            tile_pos0.append(start + first)
        first_row += n
    if len(tile_req) > num_tiles:
        raise ValueError(f"{len(tile_req)} extend tiles exceed num_tiles={num_tiles}")
    pad = num_tiles - len(tile_req)
    return {
        "tile_req": _padded(tile_req, num_tiles),
        "tile_pos0": _padded(tile_pos0, num_tiles, pad=-Q_TILE),
        "q_index": np.array(q_index + [[tokens] * Q_TILE] * pad, np.int32).reshape(
            num_tiles, Q_TILE
        ),
        "out_index": _padded(out_index, tokens),
    }
