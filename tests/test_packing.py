"""Packing: no token lost or duplicated, no target crosses a sequence boundary, and the
bookkeeping (segment ids, positions, placements, efficiency) agrees with independent counts.

The invariants are checked from the input sequences and the placements table by plain loops,
not through the packer's own vectorised bookkeeping.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_packmamba.ops.segments import positions_from_segment_ids, segment_ids_from_positions
from jax_packmamba.packing import (
    MAX_WAIT,
    POLICIES,
    PackedBatch,
    SplitSequenceWarning,
    choose_first_fit_decreasing,
    greedy_prefix,
    lookahead_tokens,
    pack_sequences,
    pad_sequences,
    rows_needed,
    unpack,
)

SEEDS = [0, 1, 2, 3, 4]

# Jitted once each: eager dispatch would compile every primitive for every new shape.
_positions_from_segment_ids = jax.jit(positions_from_segment_ids)
_segment_ids_from_positions = jax.jit(segment_ids_from_positions)


def random_sequences(seed, n, max_len, vocab=1000):
    """n sequences with lengths in [1, max_len], mostly short, and tokens in [1, vocab)."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(3.0 / max_len, size=n), max_len)
    lengths[rng.random(n) < 0.2] = 1  # Plenty of length-1 sequences.
    return [rng.integers(1, vocab, size=int(k)) for k in lengths]


def pack_quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SplitSequenceWarning)
        return pack_sequences(*args, **kwargs)


def check_batch(batch: PackedBatch, sequences, length, pad_id=0):
    """Every invariant a PackedBatch promises, checked against the input by plain loops."""
    rows = batch.tokens.shape[0]
    assert batch.tokens.shape == (rows, length)
    for name in ("tokens", "segment_ids", "positions", "targets"):
        assert getattr(batch, name).shape == (rows, length), name
        assert getattr(batch, name).dtype == np.int32, name
    assert batch.loss_mask.shape == (rows, length) and batch.loss_mask.dtype == bool
    assert batch.placements.dtype == np.int32 and batch.placements.shape[1] == 5

    # Each piece covers a slice of its sequence; the pieces of a sequence cover it exactly once,
    # in order, each at most `length` long; each slot of the batch holds at most one piece.
    owner = -np.ones((rows, length), dtype=np.int64)  # index of the piece in each slot
    pieces_of = {i: [] for i in range(len(sequences))}
    for p, (i, start, r, c, n) in enumerate(batch.placements.tolist()):
        assert 1 <= n <= length and 0 <= c and c + n <= length and 0 <= r < rows
        assert (owner[r, c : c + n] == -1).all(), "two pieces share a slot"
        owner[r, c : c + n] = p
        np.testing.assert_array_equal(batch.tokens[r, c : c + n], sequences[i][start : start + n])
        pieces_of[i].append((start, n, r, c))
    assert list(batch.placements[:, 0]) == sorted(batch.placements[:, 0]), "placements order"
    for i, seq in enumerate(sequences):
        starts = [s for s, _, _, _ in pieces_of[i]]
        assert starts == sorted(starts)
        covered = np.concatenate([seq[s : s + n] for s, n, _, _ in pieces_of[i]])
        np.testing.assert_array_equal(covered, seq)  # nothing lost, nothing twice
        # Pieces are cut at multiples of `length`: only the last one may be shorter.
        assert all(n == length for _, n, _, _ in pieces_of[i][:-1])
    total = sum(len(s) for s in sequences)
    assert (owner >= 0).sum() == total
    assert batch.num_tokens == total
    assert batch.num_sequences == len(sequences)
    assert batch.num_pieces == sum(-(-len(s) // length) for s in sequences)
    assert batch.num_split_sequences == sum(len(s) > length for s in sequences)
    assert batch.efficiency == pytest.approx(total / (rows * length), abs=0, rel=1e-12)
    np.testing.assert_array_equal(batch.sequence_lengths, [len(s) for s in sequences])

    # unpack returns every sequence exactly, as does unpacking anything computed per token.
    for got, seq in zip(unpack(batch, batch.tokens), sequences, strict=True):
        np.testing.assert_array_equal(got, seq)

    # Padding: pad_id, segment 0, no target, and only at the end of a row (no gaps).
    pad = owner < 0
    assert (batch.tokens[pad] == pad_id).all()
    assert (batch.targets[pad] == pad_id).all()
    assert not batch.loss_mask[pad].any()
    assert ((batch.segment_ids == 0) == pad).all()
    assert (np.diff(pad.astype(int), axis=1) >= 0).all(), "padding only at the end of a row"

    # Segment ids: 1, 2, ... per piece in order of position; positions count within the piece.
    for r in range(rows):
        in_row = {int(p) for p in owner[r] if p >= 0}
        row_pieces = sorted(in_row, key=lambda p: batch.placements[p, 3])
        for k, p in enumerate(row_pieces, start=1):
            _, _, _, c, n = batch.placements[p]
            assert (batch.segment_ids[r, c : c + n] == k).all()
            np.testing.assert_array_equal(batch.positions[r, c : c + n], np.arange(n))
    # The same, in the ops' own terms: positions follow from segment ids everywhere (padding is
    # its own run counting from 0), and segment ids follow from positions on the real tokens.
    from_segment_ids = np.asarray(_positions_from_segment_ids(batch.segment_ids))
    np.testing.assert_array_equal(from_segment_ids, batch.positions)
    from_positions = np.asarray(_segment_ids_from_positions(batch.positions))
    np.testing.assert_array_equal(from_positions[~pad], batch.segment_ids[~pad])

    # Targets: the true next token of the same sequence, wherever it exists, and only there.
    expected_target = np.full((rows, length), pad_id)
    expected_mask = np.zeros((rows, length), dtype=bool)
    for i, start, r, c, n in batch.placements.tolist():
        for j in range(n):
            if start + j + 1 < len(sequences[i]):
                expected_target[r, c + j] = sequences[i][start + j + 1]
                expected_mask[r, c + j] = True
    np.testing.assert_array_equal(batch.loss_mask, expected_mask)
    np.testing.assert_array_equal(batch.targets, expected_target)
    # No target crosses a boundary: a target is the next slot's token when that slot is the same
    # piece; otherwise it is the first token of the next piece of the same sequence.
    for r, t in zip(*np.nonzero(batch.loss_mask)):
        if t + 1 < length and batch.segment_ids[r, t + 1] == batch.segment_ids[r, t]:
            assert batch.targets[r, t] == batch.tokens[r, t + 1]
        else:
            i, start, _, _, n = batch.placements[owner[r, t]]
            (nxt,) = [q for q in batch.placements if q[0] == i and q[1] == start + n]
            assert batch.targets[r, t] == batch.tokens[nxt[2], nxt[3]]
    # Exactly one token per sequence has no target: its last.
    assert int((~batch.loss_mask & ~pad).sum()) == len(sequences)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_packing_invariants(seed, policy):
    length = [16, 37, 64, 128, 7][seed]
    sequences = random_sequences(seed, n=60, max_len=3 * length)
    batch = pack_quietly(sequences, length, policy=policy)
    check_batch(batch, sequences, length)


@pytest.mark.parametrize("seed", SEEDS)
def test_padded_mode_invariants(seed):
    sequences = random_sequences(seed, n=20, max_len=50)
    batch = pad_sequences(sequences)
    length = max(2, max(len(s) for s in sequences))
    check_batch(batch, sequences, length)
    assert batch.num_rows == len(sequences)
    np.testing.assert_array_equal(batch.placements[:, 2], np.arange(len(sequences)))
    np.testing.assert_array_equal(batch.placements[:, 3], 0)


def test_padded_mode_splits_and_warns():
    sequences = [np.arange(1, 11), np.arange(20, 23)]
    with pytest.warns(SplitSequenceWarning, match=r"1 of 2 sequences .* 3 pieces"):
        batch = pad_sequences(sequences, length=4, pad_id=-1)
    check_batch(batch, sequences, 4, pad_id=-1)
    # One piece per row: [1..4], [5..8], [9, 10], [20, 21, 22].
    np.testing.assert_array_equal(batch.placements[:, 2], [0, 1, 2, 3])
    np.testing.assert_array_equal(batch.tokens[2], [9, 10, -1, -1])


@pytest.mark.parametrize("seed", SEEDS)
def test_first_fit_decreasing_needs_no_more_rows_than_greedy(seed):
    sequences = random_sequences(seed + 100, n=200, max_len=100)
    ffd = pack_quietly(sequences, 128, policy="first_fit_decreasing")
    greedy = pack_quietly(sequences, 128, policy="greedy")
    assert ffd.num_rows <= greedy.num_rows
    assert ffd.efficiency >= greedy.efficiency


def test_policies_exact_layout():
    # Greedy keeps input order: [6], [5 4], [3 2] -> 3 rows. FFD: 6 -> row 0, 5 -> row 1,
    # 4 -> row 0 (full), 3 -> row 1, 2 -> row 1 (full) -> 2 rows, both exactly full.
    sequences = [np.full(n, n) for n in (6, 5, 4, 3, 2)]
    greedy = pack_sequences(sequences, 10, policy="greedy")
    np.testing.assert_array_equal(
        greedy.placements[:, 2:4], [[0, 0], [1, 0], [1, 5], [2, 0], [2, 3]]
    )
    ffd = pack_sequences(sequences, 10)
    np.testing.assert_array_equal(ffd.placements[:, 2:4], [[0, 0], [1, 0], [0, 6], [1, 5], [1, 8]])
    np.testing.assert_array_equal(ffd.tokens, [[6] * 6 + [4] * 4, [5] * 5 + [3] * 3 + [2] * 2])
    np.testing.assert_array_equal(ffd.segment_ids, [[1] * 6 + [2] * 4, [1] * 5 + [2] * 3 + [3] * 2])
    assert ffd.efficiency == 1.0 and greedy.efficiency == 20 / 30
    check_batch(ffd, sequences, 10)
    check_batch(greedy, sequences, 10)


def test_first_fit_decreasing_is_stable_for_equal_lengths():
    sequences = [np.array([k, k]) for k in range(1, 6)]
    batch = pack_sequences(sequences, 4)
    # Equal lengths keep input order: rows [1 1 2 2], [3 3 4 4], [5 5].
    np.testing.assert_array_equal(batch.tokens, [[1, 1, 2, 2], [3, 3, 4, 4], [5, 5, 0, 0]])
    # At scale: a row's free space only shrinks, so with a stable sort pieces of equal length
    # land in input order, (row, column) increasing.
    sequences = random_sequences(5, n=300, max_len=6)
    placements = pack_sequences(sequences, 8).placements
    for n in range(1, 7):
        same = placements[placements[:, 4] == n]
        slots = same[:, 2].astype(np.int64) * 8 + same[:, 3]
        assert (np.diff(slots) > 0).all(), n


@pytest.mark.parametrize("policy", POLICIES)
def test_long_sequence_is_split_counted_and_warned(policy):
    length = 8
    sequences = [np.arange(100, 120), np.arange(1, 4), np.arange(200, 209)]  # 20, 3, 9 tokens
    with pytest.warns(SplitSequenceWarning, match=r"2 of 3 sequences .*length=8.* 5 pieces"):
        batch = pack_sequences(sequences, length, policy=policy)
    assert batch.num_split_sequences == 2
    assert batch.num_pieces == 6  # 8 + 8 + 4, 3, 8 + 1
    pieces = batch.placements[batch.placements[:, 0] == 0]
    np.testing.assert_array_equal(pieces[:, 1], [0, 8, 16])
    np.testing.assert_array_equal(pieces[:, 4], [8, 8, 4])
    # The last token of a non-final piece predicts the first token of the next piece.
    _, _, r, c, n = pieces[0]
    assert batch.targets[r, c + n - 1] == 108 and batch.loss_mask[r, c + n - 1]
    check_batch(batch, sequences, length)


def test_no_warning_without_splitting():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = pack_sequences([np.arange(1, 9), np.arange(1, 4)], 8)  # exactly `length` fits
    assert batch.num_split_sequences == 0 and batch.num_pieces == 2


def test_length_one_sequences():
    sequences = [np.array([k]) for k in range(1, 12)]
    batch = pack_sequences(sequences, 4)
    check_batch(batch, sequences, 4)
    assert batch.num_rows == 3 and not batch.loss_mask.any()
    np.testing.assert_array_equal(batch.segment_ids[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(batch.positions[0], [0, 0, 0, 0])
    np.testing.assert_array_equal(batch.segment_ids[2], [1, 2, 3, 0])


@pytest.mark.parametrize("policy", POLICIES)
def test_exact_fit_rows(policy):
    sequences = [np.arange(a, b) for a, b in [(1, 4), (4, 9), (9, 17), (20, 22), (22, 28)]]
    batch = pack_sequences(sequences, 8, policy=policy)  # 3 + 5, 8, 2 + 6
    check_batch(batch, sequences, 8)
    assert batch.num_rows == 3 and batch.efficiency == 1.0
    assert (batch.segment_ids > 0).all()


@pytest.mark.parametrize("policy", POLICIES)
def test_num_rows(policy):
    sequences = random_sequences(7, n=30, max_len=20)
    needed = pack_sequences(sequences, 32, policy=policy).num_rows
    exact = pack_sequences(sequences, 32, policy=policy, num_rows=needed)
    assert exact.num_rows == needed
    padded = pack_sequences(sequences, 32, policy=policy, num_rows=needed + 3, pad_id=-5)
    check_batch(padded, sequences, 32, pad_id=-5)
    assert padded.num_rows == needed + 3
    assert (padded.segment_ids[needed:] == 0).all() and (padded.tokens[needed:] == -5).all()
    np.testing.assert_array_equal(padded.positions[needed:], np.tile(np.arange(32), (3, 1)))
    assert padded.efficiency == pytest.approx(exact.efficiency * needed / (needed + 3))
    too_small = rf"num_rows={needed - 1} is too small.* need {needed} rows"
    with pytest.raises(ValueError, match=too_small):
        pack_sequences(sequences, 32, policy=policy, num_rows=needed - 1)


def test_unpack_per_token_values():
    sequences = random_sequences(11, n=25, max_len=40)
    batch = pack_quietly(sequences, 16)
    # Per-token values with a trailing axis, derived from the token and its position.
    values = np.stack([batch.tokens * 2 + 1, batch.positions], axis=-1).astype(np.float32)
    out = unpack(batch, values)
    assert len(out) == len(sequences)
    for got, seq in zip(out, sequences):
        assert got.shape == (len(seq), 2) and got.dtype == np.float32
        np.testing.assert_array_equal(got[:, 0], seq * 2 + 1)
        np.testing.assert_array_equal(got[:, 1], np.arange(len(seq)) % 16)  # restarts per piece
    with pytest.raises(ValueError, match=r"values must have shape"):
        unpack(batch, values[:, :-1])


def test_unpack_accepts_jax_arrays():
    sequences = [np.arange(1, 6), np.arange(6, 8)]
    batch = pack_sequences(sequences, 8)
    out = unpack(batch, jnp.asarray(batch.tokens) * 10)
    np.testing.assert_array_equal(out[0], np.arange(1, 6) * 10)
    np.testing.assert_array_equal(out[1], np.arange(6, 8) * 10)


def test_accepts_lists_and_integer_dtypes():
    sequences = [[1, 2, 3], np.array([4, 5], np.uint16), (6,), np.array([7, 8], np.int64)]
    batch = pack_sequences(sequences, 4)
    check_batch(batch, [np.asarray(s) for s in sequences], 4)


def test_batch_is_immutable():
    batch = pack_sequences([[1, 2, 3]], 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.tokens = batch.tokens
    with pytest.raises(ValueError, match="read-only"):
        batch.tokens[0, 0] = 9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sequences=[[1, 2], [3], [], [4]]), r"sequences\[2\] is empty"),
        (dict(sequences=[[1, 2], [[3, 4]]]), r"sequences\[1\] must be 1-D, got shape \(1, 2\)"),
        (dict(sequences=[[1, 2], [0.5, 1.0]]), r"sequences\[1\] must hold integers"),
        (dict(sequences=[[True, False]]), r"sequences\[0\] must hold integers"),
        (dict(sequences=[[1, 2**31]]), r"sequences\[0\] has token ids outside int32"),
        (dict(sequences=[]), r"sequences is empty"),
        (dict(sequences=[1, 2, 3]), r"sequences\[0\] must be 1-D, got shape \(\)"),
        (dict(length=1), r"length must be >= 2, got length=1"),
        (dict(length=0), r"length must be >= 2"),
        (dict(length=4.0), r"length must be an integer"),
        (dict(length=True), r"length must be an integer"),
        (dict(policy="best_fit"), r"policy must be one of \('first_fit_decreasing', 'greedy'\)"),
        (dict(pad_id=2**31), r"pad_id must be in"),
        (dict(num_rows=0), r"num_rows must be >= 1"),
        (dict(num_rows=2.0), r"num_rows must be an integer"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(sequences=[[1, 2, 3], [4, 5]], length=4) | kwargs
    sequences, length = args.pop("sequences"), args.pop("length")
    with pytest.raises(ValueError, match=match):
        pack_sequences(sequences, length, **args)


def test_pad_sequences_bad_input_raises():
    with pytest.raises(ValueError, match=r"sequences\[1\] is empty"):
        pad_sequences([[1], []])
    with pytest.raises(ValueError, match=r"length must be >= 2"):
        pad_sequences([[1, 2]], length=1)


@pytest.mark.parametrize("policy", POLICIES)
def test_rows_needed_is_what_pack_sequences_uses(policy):
    rng = np.random.default_rng(7)
    for _ in range(20):
        length = int(rng.integers(8, 64))
        seqs = [np.arange(n) for n in rng.integers(1, length + 1, size=int(rng.integers(1, 40)))]
        batch = pack_sequences(seqs, length, policy=policy)
        assert rows_needed([len(s) for s in seqs], length, policy=policy) == batch.num_rows
    assert rows_needed([], 8, policy=policy) == 0
    with pytest.raises(ValueError, match="does not fit"):
        rows_needed([9], 8, policy=policy)


# ---------------------------------------------------------------------------------------------
# Streaming selection (what a training batcher puts in its next batch).


def test_greedy_prefix_is_the_longest_prefix_that_fits():
    # Rows of 10, 2 rows: [6, 3] fill row 0 (9), 5 opens row 1, 4 fits (9), 2 would open row 2.
    assert greedy_prefix([6, 3, 5, 4, 2, 1], 10, 2) == 4
    assert greedy_prefix([10, 10, 10], 10, 2) == 2
    assert greedy_prefix([7], 10, 1) == 1
    # In order: a short piece after the one that does not fit is not taken.
    assert greedy_prefix([6, 6, 1], 10, 1) == 1
    for seed in SEEDS:
        lengths = np.random.default_rng(seed).integers(1, 33, 200).tolist()
        count = greedy_prefix(lengths, 32, 4)
        assert rows_needed(lengths[:count], 32, policy="greedy") <= 4
        assert rows_needed(lengths[: count + 1], 32, policy="greedy") == 5


def test_greedy_prefix_reads_one_piece_past_the_prefix():
    read = []

    def stream():  # endless, as a training stream with wrap-around
        while True:
            read.append(4)
            yield 4

    assert greedy_prefix(stream(), 8, 2) == 4 and len(read) == 5


def test_choose_first_fit_decreasing_longest_first_and_waiting_pieces_first():
    # Rows of 10, one row: longest first takes 7 then 3 (the 5 and 4 wait).
    taken = choose_first_fit_decreasing([5, 7, 4, 3], [0, 0, 0, 0], 10, 1)
    assert taken.tolist() == [False, True, False, True]
    # The 4 has waited MAX_WAIT batches: it goes first, then the longest that still fit.
    taken = choose_first_fit_decreasing([5, 7, 4, 3], [0, 0, MAX_WAIT, 0], 10, 1)
    assert taken.tolist() == [True, False, True, False]
    # Equal keys keep the given order.
    assert choose_first_fit_decreasing([5, 5, 5], [1, 1, 1], 10, 1).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="waited has 1 entries for 2 pieces"):
        choose_first_fit_decreasing([1, 2], [0], 10, 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_choose_first_fit_decreasing_fills_rows_that_pack_sequences_accepts(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 65, 40)
    waited = rng.integers(0, MAX_WAIT + 2, 40)
    taken = choose_first_fit_decreasing(lengths, waited, 64, 4)
    chosen = [np.ones(n, np.int32) for n in lengths[taken]]
    pack_sequences(chosen, 64, num_rows=4)  # raises if they needed more rows
    # With 5x the batch's slots to choose from the rows end up nearly full (reached: >= 249).
    assert lengths[taken].sum() >= 0.95 * 4 * 64
    assert lookahead_tokens(64, 4) == 2 * 64 * 4


# ---------------------------------------------------------------- pack_stream (link mode)


def test_pack_stream_lays_sequences_end_to_end_with_links():
    from jax_packmamba.packing import pack_stream

    rng = np.random.default_rng(7)
    # Sequences of 1 token, exactly a row, many rows, and everything between.
    lengths = [1, 16, 45, 3, 1, 33, 16, 2] + list(rng.integers(1, 40, size=12))
    seqs = [rng.integers(0, 1000, size=n).astype(np.int32) for n in lengths]
    b = pack_stream(seqs, 16, num_rows=30)
    for got, want in zip(unpack(b, b.tokens), seqs):
        np.testing.assert_array_equal(got, want)
    total = sum(lengths)
    full_rows = total // 16
    assert (b.segment_ids[:full_rows] > 0).all() and (b.segment_ids[full_rows + 1 :] == 0).all()
    assert b.num_tokens == total and b.loss_mask.sum() == total - len(seqs)
    # continues[r] exactly where row r's first token is not its sequence's first token.
    starts_sequence = np.zeros_like(b.tokens, bool)
    for _, start, r, col, _ in b.placements:
        starts_sequence[r, col] = start == 0
    used = b.segment_ids[:, 0] > 0
    np.testing.assert_array_equal(b.continues, used & ~starts_sequence[:, 0])
    assert not b.continues[0]
    # A linked row's last token is trained to predict the next row's first token.
    for r in np.flatnonzero(b.continues):
        assert b.loss_mask[r - 1, -1] and b.targets[r - 1, -1] == b.tokens[r, 0]
    end = np.cumsum(lengths)
    rows_spanned = (end - 1) // 16 - (end - np.array(lengths)) // 16 + 1
    assert b.longest_chain == rows_spanned.max() > 2
    assert b.num_linked_sequences == b.num_split_sequences > 0
    with pytest.raises(ValueError, match="num_rows=2 is too small"):
        pack_stream(seqs, 16, num_rows=2)
