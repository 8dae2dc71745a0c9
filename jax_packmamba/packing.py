"""Packing variable-length token sequences into fixed-length rows (host-side numpy).

Axis letters: r rows (the batch axis of the model), t time (column within a row), p pieces.

PackMamba concatenates many sequences into one row of `length` tokens instead of padding each
sequence to the longest, and every operator resets its state where `segment_ids` changes, so a
packed row computes for each sequence exactly what that sequence computes alone. This module
decides where each sequence goes and builds the arrays the model and the loss need:

    tokens      (r, t) int32  the input ids; pad_id on padding.
    segment_ids (r, t) int32  0 on padding; 1, 2, ... numbering the pieces of a row in order of
                              position (what the segmented ops read).
    positions   (r, t) int32  position within the piece, 0 at its start (PackMamba's position
                              indices); on padding it counts from 0 within the padding run, which
                              is what `positions_from_segment_ids` gives for the padding segment.
    targets     (r, t) int32  the next token of the same original sequence; pad_id where none.
    loss_mask   (r, t) bool   True exactly where that next token exists.

A sequence longer than `length` cannot sit in one row: it is cut into consecutive pieces of
`length` tokens (the last one shorter), each placed like a sequence of its own. The cut is
counted, reported with a `SplitSequenceWarning`, and never drops a token. The last token of a
non-final piece still has its true target (the first token of the next piece): the model predicts
it from its own piece's state, so no token is predicted from another sequence and the only
tokens without a target are each sequence's last one, exactly as when it is trained alone.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from collections.abc import Callable

import numpy as np

POLICIES = ("first_fit_decreasing", "greedy")

_INT32 = np.iinfo(np.int32)

# placements columns, in order.
SEQUENCE_INDEX, START_IN_SEQUENCE, ROW, COLUMN, PIECE_LENGTH = range(5)


class SplitSequenceWarning(UserWarning):
    """Some sequences were longer than the row length and were split into pieces."""


@dataclasses.dataclass(frozen=True, eq=False)
class PackedBatch:
    """A batch of rows of packed sequences; all arrays are numpy and read-only.

    Fields (r rows, t = length columns, p pieces):
      tokens, segment_ids, positions, targets: (r, t) int32; loss_mask: (r, t) bool
        (see the module docstring for their meaning).
      placements: (p, 5) int32, one row per piece, sorted by (sequence_index, start_in_sequence),
        with columns
          0 sequence_index      index of the piece's sequence in the input list,
          1 start_in_sequence   offset of the piece's first token in that sequence,
          2 row, 3 column       where the piece's first token sits in `tokens`,
          4 piece_length        number of tokens in the piece;
        so tokens[row, column:column + piece_length]
           == sequences[sequence_index][start_in_sequence:start_in_sequence + piece_length].
        The module-level constants SEQUENCE_INDEX, ..., PIECE_LENGTH name the columns.
      continues: (r,) bool or None: row r's first piece continues row r - 1's last piece (the
        same sequence, the next tokens): the links of `pack_stream`, which the ops' `continues`
        argument takes (jax_packmamba/ops/links.py). None from the cutting packers.
    """

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    placements: np.ndarray
    continues: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        """Row length (number of columns)."""
        return self.tokens.shape[1]

    @property
    def num_sequences(self) -> int:
        """Number of input sequences (every one has at least one piece)."""
        return int(self.placements[:, SEQUENCE_INDEX].max()) + 1

    @property
    def num_pieces(self) -> int:
        return self.placements.shape[0]

    @property
    def num_split_sequences(self) -> int:
        """Number of input sequences that were longer than `length` and so cut into pieces."""
        pieces_per_sequence = np.bincount(self.placements[:, SEQUENCE_INDEX])
        return int(np.count_nonzero(pieces_per_sequence > 1))

    @property
    def sequence_lengths(self) -> np.ndarray:
        """(num_sequences,) int64 length of each input sequence."""
        return np.bincount(
            self.placements[:, SEQUENCE_INDEX],
            weights=self.placements[:, PIECE_LENGTH],
            minlength=self.num_sequences,
        ).astype(np.int64)

    @property
    def num_linked_sequences(self) -> int:
        """Number of sequences whose pieces are linked across rows (pack_stream)."""
        return 0 if self.continues is None else self.num_split_sequences

    @property
    def longest_chain(self) -> int:
        """Most rows one sequence spans (1 when none is split)."""
        return int(np.bincount(self.placements[:, SEQUENCE_INDEX]).max())

    @property
    def num_tokens(self) -> int:
        """Number of real (non-padding) tokens."""
        return int(self.placements[:, PIECE_LENGTH].sum(dtype=np.int64))

    @property
    def efficiency(self) -> float:
        """Packing efficiency: real tokens / slots (num_rows * length)."""
        return self.num_tokens / (self.num_rows * self.length)


def pack_sequences(
    sequences, length, *, policy="first_fit_decreasing", pad_id=0, num_rows=None
) -> PackedBatch:
    """Packs 1-D integer token sequences into rows of `length` tokens.

    Args:
      sequences: a list of 1-D integer arrays or lists, each of at least one token; token values
        must fit in int32.
      length: the row length, at least 2.
      policy: "first_fit_decreasing": pieces sorted by length, longest first (stable, so equal
        lengths keep input order), each placed in the first row with room, rows opened as
        needed; usually the fewest rows. "greedy": PackMamba's in-order greedy: in input order,
        append to the current row if the piece fits, else start a new row; keeps input order.
      pad_id: the token id written on padding (tokens and targets).
      num_rows: if given, the batch has exactly this many rows (rows beyond those the policy
        needs are all padding); ValueError if the policy needs more.

    Returns:
      A PackedBatch. Sequences longer than `length` are split into pieces of `length` tokens
      (the last shorter) and a SplitSequenceWarning reports how many.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return _pack(
        sequences,
        length,
        _PLACERS[policy],
        pad_id=pad_id,
        num_rows=num_rows,
        caller="pack_sequences",
    )


def pack_stream(sequences, length, *, pad_id=0, num_rows=None) -> PackedBatch:
    """Packs sequences end to end, in input order, into rows of `length` tokens, with links.

    A sequence that reaches a row's end goes on at the start of the next row, and
    `continues[r]` records that row r's first piece continues row r - 1's last one, so a model
    given the links computes every sequence exactly as if it were one row (nothing is cut).
    Every row but the last is full; padding is only at the end. This is the `link` mode of the
    trainer (--data.long_docs). Same arguments as pack_sequences (no policy: the order is the
    input's, which is what keeps the pieces of a sequence in consecutive rows).
    """
    seqs = _check_sequences(sequences)
    length = _check_int("length", length, minimum=2)
    pad_id = _check_int("pad_id", pad_id, minimum=_INT32.min, maximum=_INT32.max)
    seq_lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    seq_end = np.cumsum(seq_lengths)  # in the stream of all tokens
    seq_begin = seq_end - seq_lengths
    first_row, last_row = seq_begin // length, (seq_end - 1) // length
    pieces_per_seq = last_row - first_row + 1
    piece_seq = np.repeat(np.arange(len(seqs)), pieces_per_seq)
    piece_row = (
        first_row[piece_seq]
        + np.arange(len(piece_seq))
        - np.repeat(np.cumsum(pieces_per_seq) - pieces_per_seq, pieces_per_seq)
    )
    begin = np.maximum(seq_begin[piece_seq], piece_row * length)
    end = np.minimum(seq_end[piece_seq], (piece_row + 1) * length)
    needed_rows = int(last_row[-1]) + 1
    if num_rows is None:
        num_rows = needed_rows
    else:
        num_rows = _check_int("num_rows", num_rows, minimum=1)
        if num_rows < needed_rows:
            raise ValueError(
                f"num_rows={num_rows} is too small: these {len(seqs)} sequences "
                f"({int(seq_lengths.sum())} tokens) need {needed_rows} rows of "
                f"length={length}"
            )
    arrays = _arrays(
        seqs,
        length,
        num_rows,
        pad_id,
        seq_lengths,
        piece_seq,
        begin - seq_begin[piece_seq],
        piece_row,
        begin - piece_row * length,
        end - begin,
    )
    continues = np.zeros(num_rows, bool)
    later = (begin - seq_begin[piece_seq] > 0) & (begin == piece_row * length)
    continues[piece_row[later]] = True
    continues.flags.writeable = False
    return PackedBatch(**arrays, continues=continues)


def pad_sequences(sequences, length=None, pad_id=0) -> PackedBatch:
    """The padded batching mode: one sequence per row, padded at the end to `length`.

    `length` defaults to the longest sequence (at least 2, like pack_sequences). A sequence
    longer than `length` is split the same way as in pack_sequences, one piece per row, and
    reported with a SplitSequenceWarning. The result is a PackedBatch like pack_sequences's, so
    the same model, loss and `unpack` serve both modes.
    """
    seqs = _check_sequences(sequences)
    if length is None:
        length = max(2, max(len(s) for s in seqs))
    return _pack(
        seqs, length, _place_one_per_row, pad_id=pad_id, num_rows=None, caller="pad_sequences"
    )


def rows_needed(piece_lengths, length, *, policy="first_fit_decreasing") -> int:
    """How many rows of `length` a policy needs for pieces of these lengths (each <= length).

    What pack_sequences would produce, without building the arrays: a streaming batcher uses
    it to decide which pieces still fit in a fixed number of rows.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    piece_lengths = np.asarray(piece_lengths, dtype=np.int64)
    if piece_lengths.size == 0:
        return 0
    if piece_lengths.max() > length:
        raise ValueError(f"a piece of {piece_lengths.max()} tokens does not fit in {length=}")
    rows, _ = _PLACERS[policy](piece_lengths, length)
    return int(rows.max()) + 1


# ---------------------------------------------------------------------------------------------
# Streaming selection: which pieces of a stream go into the next batch of num_rows rows.
# A training batcher owns the stream and its position; these functions make every decision.

LOOKAHEAD = 2.0  # first-fit-decreasing chooses among pieces worth this many batches ...
MAX_WAIT = 4  # ... and places a piece that has waited this many batches before any other


def greedy_prefix(piece_lengths, length: int, num_rows: int) -> int:
    """How many pieces from the start of a stream PackMamba's in-order greedy puts in num_rows
    rows of `length`: the longest prefix that fits (at least the first piece).

    piece_lengths: an iterable of piece lengths (each <= length) in stream order; it is read
    one piece past the last one taken, so it may be a lazy, endless stream.
    """
    rows, fill, taken = 1, 0, 0
    for n in piece_lengths:
        if taken and fill + n > length:  # next fit: the piece opens a new row
            rows, fill = rows + 1, 0
        if rows > num_rows:
            break
        fill += n
        taken += 1
    return taken


def lookahead_tokens(length: int, num_rows: int) -> float:
    """Tokens of candidates (waiting pieces, then new ones) that `choose_first_fit_decreasing`
    wants to choose from for one batch: LOOKAHEAD batches' worth of slots."""
    return LOOKAHEAD * length * num_rows


def choose_first_fit_decreasing(
    piece_lengths, waited, length: int, num_rows: int, *, max_wait: int = MAX_WAIT
) -> np.ndarray:
    """Which candidate pieces fill the next batch of num_rows rows of `length` (bool mask).

    Candidates (lengths <= length, with the number of batches each has waited) are tried
    longest first, except that those which have waited max_wait batches go first, so none waits
    forever; equal keys keep the given order. A piece is taken when first-fit-decreasing (what
    pack_sequences then does) still needs <= num_rows rows for it and the pieces taken before;
    the others wait for a later batch.
    """
    piece_lengths = [int(n) for n in piece_lengths]
    waited = [int(w) for w in waited]
    if len(waited) != len(piece_lengths):
        raise ValueError(f"waited has {len(waited)} entries for {len(piece_lengths)} pieces")
    order = sorted(
        range(len(piece_lengths)), key=lambda i: (waited[i] < max_wait, -piece_lengths[i], i)
    )
    capacity = length * num_rows
    taken = np.zeros(len(piece_lengths), dtype=bool)
    chosen: list[int] = []
    for i in order:
        n = piece_lengths[i]
        if sum(chosen) + n <= capacity and rows_needed(chosen + [n], length) <= num_rows:
            taken[i] = True
            chosen.append(n)
    return taken


def unpack(batch: PackedBatch, values) -> list[np.ndarray]:
    """Gathers per-token values back into the input sequences.

    Args:
      batch: the PackedBatch the values were computed on.
      values: array of shape (rows, length, ...), e.g. per-token model outputs or losses
        (a jax array is copied to the host).

    Returns:
      A list with one array per input sequence, in input order, of shape (len(sequence), ...):
      the values at its pieces' slots, concatenated in order.
    """
    values = np.asarray(values)
    if values.shape[:2] != batch.tokens.shape:
        raise ValueError(
            f"values must have shape (rows, length, ...) with (rows, length) = "
            f"{batch.tokens.shape}, got shape {values.shape}"
        )
    rows, cols = _token_slots(batch.placements)
    gathered = values[rows, cols]  # (total tokens, ...), in input order.
    ends = np.cumsum(batch.sequence_lengths)[:-1]
    return np.split(gathered, ends)


# ---------------------------------------------------------------------------------------------
# The shared machinery.


def _pack(sequences, length, place: Callable, *, pad_id, num_rows, caller: str) -> PackedBatch:
    seqs = _check_sequences(sequences)
    length = _check_int("length", length, minimum=2)
    pad_id = _check_int("pad_id", pad_id, minimum=_INT32.min, maximum=_INT32.max)
    if num_rows is not None:
        num_rows = _check_int("num_rows", num_rows, minimum=1)

    # Cut every sequence into pieces of at most `length` tokens, in input order.
    seq_lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    pieces_per_seq = -(-seq_lengths // length)
    piece_seq = np.repeat(np.arange(len(seqs)), pieces_per_seq)
    first_piece = np.cumsum(pieces_per_seq) - pieces_per_seq
    piece_start = (np.arange(len(piece_seq)) - first_piece[piece_seq]) * length
    piece_len = np.minimum(length, seq_lengths[piece_seq] - piece_start)

    num_split = int(np.count_nonzero(pieces_per_seq > 1))
    if num_split:
        warnings.warn(
            f"{caller}: {num_split} of {len(seqs)} sequences are longer than length={length} and "
            f"were split into {int(pieces_per_seq[pieces_per_seq > 1].sum())} pieces "
            f"({len(piece_seq)} pieces in all); no token was dropped",
            SplitSequenceWarning,
            stacklevel=3,
        )

    piece_row, piece_col = place(piece_len, length)
    needed_rows = int(piece_row.max()) + 1
    if num_rows is None:
        num_rows = needed_rows
    elif num_rows < needed_rows:
        raise ValueError(
            f"num_rows={num_rows} is too small: these {len(seqs)} sequences "
            f"({int(seq_lengths.sum())} tokens, {len(piece_seq)} pieces) need {needed_rows} rows "
            f"of length={length}"
        )

    return PackedBatch(
        **_arrays(
            seqs,
            length,
            num_rows,
            pad_id,
            seq_lengths,
            piece_seq,
            piece_start,
            piece_row,
            piece_col,
            piece_len,
        )
    )


def _arrays(
    seqs,
    length,
    num_rows,
    pad_id,
    seq_lengths,
    piece_seq,
    piece_start,
    piece_row,
    piece_col,
    piece_len,
) -> dict:
    """The PackedBatch arrays (read-only) of pieces placed at (piece_row, piece_col)."""
    placements = np.stack([piece_seq, piece_start, piece_row, piece_col, piece_len], axis=1)
    placements = placements.astype(np.int32)

    # Number the pieces of each row 1, 2, ... in order of column.
    by_slot = np.lexsort((piece_col, piece_row))
    sorted_rows = piece_row[by_slot]
    first_in_row = np.searchsorted(sorted_rows, sorted_rows, side="left")
    piece_segment = np.empty(len(piece_seq), dtype=np.int32)
    piece_segment[by_slot] = np.arange(len(piece_seq)) - first_in_row + 1

    # Every real token at once: the concatenated input is in piece order, so token g of it
    # belongs to piece piece_of_token[g] and sits at (rows[g], cols[g]).
    flat = np.concatenate(seqs)
    rows, cols = _token_slots(placements)
    piece_of_token = np.repeat(np.arange(len(piece_seq)), piece_len)
    within_piece = cols - piece_col[piece_of_token]
    # Token g has a target iff g + 1 is still in its own sequence (whichever piece holds it).
    seq_end = np.cumsum(seq_lengths)[piece_seq[piece_of_token]]
    has_next = np.arange(len(flat)) + 1 < seq_end
    next_token = np.append(flat[1:], np.int32(pad_id))

    shape = (num_rows, length)
    tokens = np.full(shape, pad_id, dtype=np.int32)
    segment_ids = np.zeros(shape, dtype=np.int32)
    targets = np.full(shape, pad_id, dtype=np.int32)
    loss_mask = np.zeros(shape, dtype=bool)
    tokens[rows, cols] = flat
    segment_ids[rows, cols] = piece_segment[piece_of_token]
    targets[rows, cols] = np.where(has_next, next_token, pad_id)
    loss_mask[rows, cols] = has_next

    # Pieces fill each row from column 0 without gaps, so padding is one run at the row's end;
    # its positions count from 0 like those of any other segment.
    fill = np.bincount(piece_row, weights=piece_len, minlength=num_rows).astype(np.int64)
    t = np.arange(length)
    positions = np.where(t[None, :] >= fill[:, None], t[None, :] - fill[:, None], 0)
    positions = positions.astype(np.int32)
    positions[rows, cols] = within_piece

    arrays = dict(
        tokens=tokens,
        segment_ids=segment_ids,
        positions=positions,
        targets=targets,
        loss_mask=loss_mask,
        placements=placements,
    )
    for a in arrays.values():
        a.flags.writeable = False  # The dataclass is frozen; make its contents so too.
    return arrays


def _token_slots(placements):
    """(row, column) of every real token, in input order (sequence by sequence)."""
    piece_len = placements[:, PIECE_LENGTH].astype(np.int64)
    piece_of_token = np.repeat(np.arange(len(placements)), piece_len)
    first_token = np.cumsum(piece_len) - piece_len
    within = np.arange(int(piece_len.sum())) - first_token[piece_of_token]
    rows = placements[piece_of_token, ROW]
    cols = placements[piece_of_token, COLUMN] + within
    return rows, cols


def _check_sequences(sequences) -> list[np.ndarray]:
    """Returns the sequences as a list of 1-D int32 arrays, or raises ValueError naming one."""
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__iter__"):
        raise ValueError(f"sequences must be a list of 1-D integer arrays, got {type(sequences)}")
    seqs = []
    for i, s in enumerate(sequences):
        a = np.asarray(s)
        if a.ndim != 1:
            raise ValueError(f"sequences[{i}] must be 1-D, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"sequences[{i}] is empty; every sequence needs at least one token")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"sequences[{i}] must hold integers, got dtype {a.dtype}")
        if a.min() < _INT32.min or a.max() > _INT32.max:
            raise ValueError(
                f"sequences[{i}] has token ids outside int32: min {a.min()}, max {a.max()}"
            )
        seqs.append(a.astype(np.int32))
    if not seqs:
        raise ValueError("sequences is empty; there is nothing to pack")
    return seqs


def _check_int(name, value, *, minimum, maximum=None) -> int:
    # bool is an int subclass, but length=True is a bug, not 1.
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {name}={value}")
    return value


# ---------------------------------------------------------------------------------------------
# Placement policies: (piece_len (p,), length) -> (row (p,), column (p,)) of each piece.
# Every piece is at most `length` long, and each row is filled from column 0 without gaps.


def _place_greedy(piece_len, length):
    """PackMamba's in-order greedy (next fit): one open row at a time, in input order."""
    rows = np.empty(len(piece_len), dtype=np.int64)
    cols = np.empty(len(piece_len), dtype=np.int64)
    row, fill = 0, 0
    for i, n in enumerate(piece_len.tolist()):
        if fill + n > length:
            row, fill = row + 1, 0
        rows[i], cols[i] = row, fill
        fill += n
    return rows, cols


def _place_first_fit_decreasing(piece_len, length):
    """Longest first, each into the first row with room.

    "First row with room" is found in O(log p) with a max-tree over the rows' free space; rows
    not yet opened have all `length` free, so the first fit is an open row if one has room and
    otherwise the next new row, which is exactly "open rows as needed". There are never more
    rows than pieces, so p leaves suffice.
    """
    p = len(piece_len)
    size = 1 << max(0, (p - 1).bit_length())
    free = [length] * (2 * size)  # free[1] is the root; leaves are free[size:size + p].
    rows = np.empty(p, dtype=np.int64)
    cols = np.empty(p, dtype=np.int64)
    lengths = piece_len.tolist()
    for i in np.argsort(-piece_len, kind="stable").tolist():
        n = lengths[i]
        node = 1
        while node < size:  # Descend to the leftmost leaf with at least n free.
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        rows[i], cols[i] = node - size, length - free[node]
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows, cols


def _place_one_per_row(piece_len, length):
    """The padded mode: piece i alone in row i."""
    return np.arange(len(piece_len)), np.zeros(len(piece_len), dtype=np.int64)


_PLACERS = {"first_fit_decreasing": _place_first_fit_decreasing, "greedy": _place_greedy}
