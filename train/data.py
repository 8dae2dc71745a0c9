"""Documents, tokenizers, the held-out split and the three batching modes (host-side numpy).

Pipeline:
  source -> documents (1-D int arrays, each ending with the end-of-document id)
         -> held-out split by document (seeded)
         -> pieces: documents cut into consecutive pieces of at most seq_len tokens
         -> a stream of pieces, each epoch a seeded permutation; its position is one integer
            (pieces consumed), which is all a checkpoint needs to resume the data exactly
         -> micro-batches in one of the modes, all consuming the same stream in the same order:
              packed  as many next pieces as fit in (batch_size, seq_len) rows (PackMamba)
              padded  the next batch_size pieces, one per row, padded to seq_len
              single  the next piece alone, padded to a multiple of single_bucket

Tokenizers are jax_packmamba.tokenizer's (bytes: UTF-8 bytes are ids 0..255, end of document
256, vocabulary 257; or a local tokenizer.json). A document's last real token is its
end-of-document id, so the model learns where documents end; no loss crosses a boundary because
every batch carries segment_ids and a loss_mask (see jax_packmamba.packing).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
from collections.abc import Iterator

import numpy as np

from jax_packmamba import packing
from jax_packmamba.packing import pack_sequences, pack_stream, pad_sequences
from jax_packmamba.tokenizer import EOD_NAMES, ByteTokenizer, load_tokenizer
from train.config import DataConfig


class DataError(ValueError):
    """Missing, empty or unreadable training data; the message names the file or option."""


def make_tokenizer(config: DataConfig):
    """The tokenizer of --data.tokenizer / --data.eod_id (DataError when it cannot be made)."""
    flags = f"--data.tokenizer={config.tokenizer}" + (
        "" if config.eod_id is None else f" --data.eod_id={config.eod_id}"
    )
    try:
        tokenizer = load_tokenizer(config.tokenizer, config.eod_id)
    except (ImportError, ValueError) as e:
        raise DataError(f"{flags}: {e}") from None
    if tokenizer.eod_id is None:
        raise DataError(
            f"{flags} has none of the end-of-document tokens {EOD_NAMES}; set --data.eod_id"
        )
    return tokenizer


# ------------------------------------------------------------------------------------------------
# Documents.


@dataclasses.dataclass
class Corpus:
    """Token documents (each ends with eod_id) and what produced them."""

    documents: list[np.ndarray]
    vocab_size: int
    eod_id: int
    description: str

    @property
    def num_tokens(self) -> int:
        return int(sum(len(d) for d in self.documents))


def _is_saved_dataset(path: pathlib.Path) -> bool:
    """A directory written by Hugging Face datasets' save_to_disk (a Dataset or DatasetDict)."""
    return ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()) or (
        path / "dataset_dict.json"
    ).is_file()


def _walk(root: pathlib.Path) -> list[pathlib.Path]:
    """Files under root (hidden ones skipped), with each save_to_disk directory as one entry."""
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            found.extend([path] if _is_saved_dataset(path) else _walk(path))
        elif path.is_file():
            found.append(path)
    return found


def _source_files(source: str) -> list[pathlib.Path]:
    files = []
    for item in (s.strip() for s in source.split(",")):
        if not item:
            continue
        path = pathlib.Path(item).expanduser()
        if path.is_file() or (path.is_dir() and _is_saved_dataset(path)):
            files.append(path)
        elif path.is_dir():
            found = _walk(path)
            if not found:
                raise DataError(f"--data.source: directory {path} has no files")
            files.extend(found)
        else:
            raise DataError(
                f"--data.source: {path} does not exist (use 'stdlib' for the embedded "
                f"corpus, or paths of text/.jsonl/.parquet/.arrow/.npy/.bin files, "
                f"save_to_disk datasets or directories)"
            )
    if not files:
        raise DataError(f"--data.source={source!r} names no files")
    return files


SUFFIX_FORMATS = {
    ".npy": "tokens",
    ".bin": "tokens",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    ".arrow": "arrow",
}


def _file_format(path: pathlib.Path, fmt: str) -> str:
    if path.is_dir():
        return "saved_dataset"
    if fmt != "auto":
        return fmt
    return SUFFIX_FORMATS.get(path.suffix, "text")


def _read_jsonl(path: pathlib.Path, field: str) -> Iterator[bytes]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(
                    f'{path}:{lineno}: expected an object with a string "{field}" '
                    f"field (--data.text_field)"
                )
            yield record[field].encode("utf-8")


def _need(module: str, path: pathlib.Path, what: str):
    """Imports an optional reader (pyarrow, datasets): DataError naming the extra if missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"{path}: reading {what} needs {module.split('.')[0]}: pip install -e '.[data]'"
        ) from None


# Rows read from a Parquet / Arrow / datasets table at a time (the file is never read whole).
TABLE_BATCH_ROWS = 1024


def _table_batches(path: pathlib.Path, fmt: str):
    """(column names, iterator of pyarrow record batches or tables) of a table source."""
    pa = _need("pyarrow", path, f"{fmt} files")
    try:
        if fmt == "parquet":
            pq = _need("pyarrow.parquet", path, "Parquet files")
            reader = pq.ParquetFile(path)
            return reader.schema_arrow, reader.iter_batches(batch_size=TABLE_BATCH_ROWS)
        if fmt == "arrow":  # the IPC file format, or the stream format that datasets writes
            source = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                reader = pa.ipc.open_stream(pa.memory_map(str(path)))
                batches = iter(reader)
            return reader.schema, batches
        datasets = _need("datasets", path, "save_to_disk datasets")
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(
                f"{path} holds the splits {list(ds)}: name one split's directory "
                f"(e.g. {path / next(iter(ds))})"
            )
        return ds.data.schema, ds.with_format("arrow").iter(batch_size=TABLE_BATCH_ROWS)
    except DataError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read as {fmt}: {' '.join(str(e).split())}") from None


def _read_table(path: pathlib.Path, fmt: str, field: str) -> Iterator[bytes]:
    """The UTF-8 texts of column `field`, batch by batch; DataError naming the file and the
    row for a missing column or a null."""
    import pyarrow as pa

    schema, batches = _table_batches(path, fmt)
    if field not in schema.names:
        raise DataError(
            f"{path}: no column {field!r} (columns: {schema.names}); set --data.text_field"
        )
    kind = schema.field(field).type
    if not (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    ):
        raise DataError(f"{path}: column {field!r} holds {kind}, not text (--data.text_field)")
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as e:  # a damaged part of the file
            raise DataError(
                f"{path}: cannot read as {fmt} after row {row}: {' '.join(str(e).split())}"
            ) from None
        if batch is None:
            return
        column = batch.column(field)
        if column.null_count:
            first = column.is_null().to_pylist().index(True)
            raise DataError(f"{path}: row {row + first}: {field!r} is null, expected a string")
        for text in column.to_pylist():
            yield text.encode("utf-8")
        row += len(column)


def _add_texts(docs: list, texts, tokenizer, eod: np.ndarray, limit: int | None) -> None:
    """Tokenizes texts (an iterable of bytes) into docs, chunk by chunk, stopping at limit
    documents without reading further."""
    chunk = []
    for text in itertools.chain(texts, [None]):  # None: the end, tokenize what is left
        if text:
            chunk.append(text)
        if chunk and (text is None or len(chunk) == TABLE_BATCH_ROWS):
            docs.extend(np.concatenate([t, eod]) for t in tokenizer.encode_batch(chunk) if t.size)
            chunk = []
            if limit is not None and len(docs) >= limit:
                return


def _read_tokens(path: pathlib.Path, bin_dtype: str, eod_id: int) -> list[np.ndarray]:
    """A token stream split after every eod_id (the eod stays with its document)."""
    try:
        if path.suffix == ".npy":
            stream = np.load(path, allow_pickle=False)
        else:
            stream = np.fromfile(path, dtype=np.dtype(bin_dtype))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read tokens: {e}") from None
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise DataError(
            f"{path}: expected a 1-D integer token array, got {stream.dtype} {stream.shape}"
        )
    if stream.size and (stream.min() < 0 or stream.max() > np.iinfo(np.int32).max):
        raise DataError(
            f"{path}: token ids must lie in [0, 2**31), got [{stream.min()}, {stream.max()}]"
        )
    stream = stream.astype(np.int32)
    ends = np.flatnonzero(stream == eod_id) + 1
    docs = [d for d in np.split(stream, ends) if d.size and not (d.size == 1 and d[0] == eod_id)]
    return docs


def load_corpus(config: DataConfig) -> Corpus:
    """Reads and tokenizes the documents named by config.source (DataError when none)."""
    tokenizer = make_tokenizer(config)
    eod = np.array([tokenizer.eod_id], np.int32)
    docs: list[np.ndarray] = []
    if config.source.strip() == "stdlib":
        from jax_packmamba.corpus import stdlib_documents

        raw = stdlib_documents(config.max_documents)
        if isinstance(tokenizer, ByteTokenizer):
            tokenized = [r.astype(np.int32) for r in raw]
        else:
            tokenized = tokenizer.encode_batch([r.tobytes() for r in raw])
        docs = [np.concatenate([t, eod]) for t in tokenized]
        description = "stdlib (Python standard library sources)"
    else:
        files = _source_files(config.source)
        limit = config.max_documents
        for path in files:
            fmt = _file_format(path, config.format)
            if fmt == "tokens":
                docs.extend(_read_tokens(path, config.bin_dtype, tokenizer.eod_id))
            else:
                try:
                    if fmt == "jsonl":
                        texts = _read_jsonl(path, config.text_field)
                    elif fmt in ("parquet", "arrow", "saved_dataset"):
                        texts = _read_table(path, fmt, config.text_field)
                    else:
                        texts = [path.read_bytes()]
                    _add_texts(docs, texts, tokenizer, eod, limit)
                except OSError as e:
                    raise DataError(f"{path}: cannot read: {e}") from None
            if limit is not None and len(docs) >= limit:
                docs = docs[:limit]
                break
        description = f"{config.source} ({len(files)} file{'s' if len(files) != 1 else ''})"
    if not docs:
        raise DataError(f"--data.source={config.source!r}: no non-empty documents found")
    max_id = max(int(d.max()) for d in docs)
    vocab = max(tokenizer.vocab_size, max_id + 1)
    return Corpus(docs, vocab, tokenizer.eod_id, description)


def split_documents(docs: list[np.ndarray], eval_fraction: float, seed: int):
    """(train, eval) documents: a seeded choice of ceil(fraction * n) held-out documents."""
    if eval_fraction <= 0:
        return list(docs), []
    n_eval = int(np.ceil(eval_fraction * len(docs)))
    if n_eval >= len(docs):
        raise DataError(
            f"only {len(docs)} document(s): too few to hold {n_eval} out for eval; add "
            f"documents or set --data.eval_fraction=0"
        )
    perm = np.random.default_rng([seed, 0xE7A1]).permutation(len(docs))
    held = np.zeros(len(docs), bool)
    held[perm[:n_eval]] = True
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def cut_pieces(docs: list[np.ndarray], seq_len: int) -> list[np.ndarray]:
    """Every document cut into consecutive pieces of at most seq_len tokens (views, in order)."""
    return [d[i : i + seq_len] for d in docs for i in range(0, len(d), seq_len)]


# ------------------------------------------------------------------------------------------------
# Batching.

BATCH_KEYS = ("tokens", "segment_ids", "targets", "loss_mask")
LONG_DOCS = ("cut", "link", "link_across_steps")


class Batcher:
    """Deterministic, resumable micro-batches from a list of pieces.

    The stream is epoch after epoch of `np.random.default_rng([seed, epoch]).permutation`; the
    position is `consumed` (pieces pulled from the stream so far) plus `carry` (the stream
    positions of pulled pieces that packed mode has not placed yet); state()/restore() save it.
    next() returns a dict of numpy arrays of shape (grad_accum, rows, length) for BATCH_KEYS
    plus host statistics. Which pieces packed mode takes is jax_packmamba.packing's decision.

    long_docs="link" (packed mode only): `pieces` are whole documents, laid end to end in
    stream order by packing.pack_stream, and the batch also has "continues" (grad_accum, rows,
    1) bool: row r continues row r - 1's last document. Row 0's flag says the micro-batch
    starts with the rest of a document the previous micro-batch (or step) did not finish,
    which starts from a zero state (the only cut left, at batch edges). `offset` (tokens of
    the current document already used) joins the resumable position.

    long_docs="link_across_steps" (packed mode only): every row is a stream of its own (the
    classic layout of truncated backprop through time). Row r packs whole documents end to
    end, pulling the next one from the shared stream when its current one ends, and its last
    document goes on in row r of the next micro-batch (and step). "continues" row r: the row
    starts with the rest of the document row r ended with in the previous micro-batch (whose
    state the step carries over); there are no links between the rows of a micro-batch. A
    token whose document goes on in the next micro-batch has its true target (the
    document's next token). `rows` (each row's [stream position of its current document or
    -1, tokens of it already used, micro-batches it has spanned]) and `longest` (the most
    micro-batch rows one document has spanned so far) join the resumable position.

    stream_groups=G (link_across_steps only): G * batch_size row streams in G groups of
    batch_size; micro-batch m (counted over steps and grad_accum micro-batches) serves group
    m mod G's rows, so a row's document goes on G micro-batches later, and the G - 1
    micro-batches between hold other documents (the step carries every group's states and
    runs group m mod G's, train.step). `rows` then holds G * batch_size streams, group g's at
    [g * batch_size, (g + 1) * batch_size), and `micro` (micro-batches served) joins the
    position. G = 1 is the layout above, its saved position unchanged.
    """

    def __init__(
        self,
        pieces: list[np.ndarray],
        *,
        mode: str,
        seq_len: int,
        batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        pack_policy: str = "first_fit_decreasing",
        single_bucket: int = 64,
        shuffle: bool = True,
        wrap: bool = True,
        consumed: int = 0,
        long_docs: str = "cut",
        stream_groups: int = 1,
    ):
        if not pieces:
            raise DataError("no training pieces (every document went to the eval split?)")
        if long_docs == "auto":
            raise ValueError(
                "long_docs='auto' is the trainer's choice: resolve it first "
                "(train.config.resolve_long_docs) or pass one of " + ", ".join(LONG_DOCS)
            )
        if long_docs not in LONG_DOCS:
            raise ValueError(f"long_docs must be one of {LONG_DOCS}, got {long_docs!r}")
        if long_docs != "cut" and mode != "packed":
            raise ValueError(f"long_docs={long_docs!r} needs mode='packed', got {mode!r}")
        if not isinstance(stream_groups, int) or stream_groups < 1:
            raise ValueError(f"stream_groups must be an int >= 1, got {stream_groups!r}")
        if stream_groups > 1 and long_docs != "link_across_steps":
            raise ValueError(
                f"stream_groups={stream_groups} needs long_docs='link_across_steps', "
                f"got {long_docs!r}"
            )
        self.pieces = pieces
        self.lengths = np.array([len(p) for p in pieces], np.int64)
        if long_docs == "cut" and self.lengths.max() > seq_len:
            raise ValueError(f"a piece has {self.lengths.max()} tokens > {seq_len=}")
        self.long_docs = long_docs
        self.offset = 0  # link: tokens of the stream's current document already used
        # link_across_steps: per row [stream position of its document (-1: none), tokens of it
        # used, micro-batch rows it has spanned], stream_groups groups of batch_size rows; the
        # most rows one document has spanned; micro-batches served (group micro % groups next).
        self.rows = [[-1, 0, 0] for _ in range(stream_groups * batch_size)]
        self.longest = 0
        self.stream_groups, self.micro = stream_groups, 0
        self.mode, self.seq_len, self.batch_size = mode, seq_len, batch_size
        self.grad_accum, self.seed, self.pack_policy = grad_accum, seed, pack_policy
        self.single_bucket, self.shuffle, self.wrap = single_bucket, shuffle, wrap
        self.consumed = consumed
        self.carry: list[list[int]] = []  # [stream position, batches waited] of pulled pieces
        # that packed mode has not placed yet
        self._orders: dict[int, np.ndarray] = {}

    # -- the stream
    def _index(self, g: int) -> int:
        n = len(self.pieces)
        epoch, i = divmod(g, n)
        if not self.shuffle:
            return i
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
        return int(self._orders[epoch][i])

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.pieces)

    def state(self) -> dict:
        state = {"consumed": int(self.consumed), "carry": [[int(g), int(w)] for g, w in self.carry]}
        if self.long_docs == "link":  # cut mode's position stays what it always was
            state["offset"] = int(self.offset)
        elif self.long_docs == "link_across_steps":
            state["rows"] = [[int(x) for x in row] for row in self.rows]
            state["longest"] = int(self.longest)
            if self.stream_groups > 1:
                state["micro"] = int(self.micro)
        return state

    def restore(self, state: dict) -> None:
        if self.long_docs == "link_across_steps":
            rows, streams = state.get("rows"), self.stream_groups * self.batch_size
            if rows is None or len(rows) != streams:
                raise ValueError(
                    f"long_docs='link_across_steps' resumes from a state with one stream per "
                    f"row ({streams} rows: {self.stream_groups} group(s) of {self.batch_size}), "
                    f"got {None if rows is None else len(rows)}"
                )
            if self.stream_groups > 1 and "micro" not in state:
                raise ValueError(
                    f"stream_groups={self.stream_groups} resumes from a state with its "
                    f"micro-batch count ('micro'), got keys {sorted(state)}"
                )
            self.rows = [[int(x) for x in row] for row in rows]
            self.longest = int(state.get("longest", 0))
            self.micro = int(state.get("micro", 0))
        self.consumed = int(state["consumed"])
        self.carry = [[int(g), int(w)] for g, w in state.get("carry", [])]
        self.offset = int(state.get("offset", 0))

    # -- one micro-batch
    def _take_packed(self) -> list[np.ndarray]:
        if self.pack_policy == "greedy":
            return self._take_greedy()
        return self._take_first_fit_decreasing()

    def _stream_lengths(self) -> Iterator[int]:
        """Lengths of the stream's pieces from the current position (the first one even when a
        stream without wrap-around is used up, as packed mode always takes one piece)."""
        g = self.consumed
        while True:
            yield int(self.lengths[self._index(g)])
            g += 1
            if not self.wrap and g >= len(self.pieces):
                return

    def _take_greedy(self) -> list[np.ndarray]:
        """PackMamba's in-order greedy: the longest prefix of the stream that fits."""
        count = packing.greedy_prefix(self._stream_lengths(), self.seq_len, self.batch_size)
        taken = [self.pieces[self._index(self.consumed + i)] for i in range(count)]
        self.consumed += count
        return taken

    def _take_first_fit_decreasing(self) -> list[np.ndarray]:
        """The waiting pieces and then new stream pieces, pulled until they hold
        packing.lookahead_tokens, are the candidates; packing.choose_first_fit_decreasing picks
        the batch, and the others wait (their stream positions, in order, are the carry)."""
        window = packing.lookahead_tokens(self.seq_len, self.batch_size)
        candidates = [tuple(c) for c in self.carry]  # (stream position, batches waited)
        total = sum(int(self.lengths[self._index(g)]) for g, _ in candidates)
        while total < window and (self.wrap or self.consumed < len(self.pieces)):
            candidates.append((self.consumed, 0))
            total += int(self.lengths[self._index(self.consumed)])
            self.consumed += 1
        taken = packing.choose_first_fit_decreasing(
            [self.lengths[self._index(g)] for g, _ in candidates],
            [w for _, w in candidates],
            self.seq_len,
            self.batch_size,
        )
        # Candidates are in stream order (the carry is, and new pieces come after it).
        self.carry = [[g, w + 1] for (g, w), t in zip(candidates, taken) if not t]
        return [self.pieces[self._index(g)] for (g, _), t in zip(candidates, taken) if t]

    def _take_stream(self) -> tuple[list[np.ndarray], bool]:
        """Link modes: the stream's documents from the current position until the batch is
        full (the last one possibly only begun); and whether the first is a rest."""
        room = self.batch_size * self.seq_len
        rest = self.offset > 0
        taken = []
        while room and (self.wrap or self.consumed < len(self.pieces)):
            doc = self.pieces[self._index(self.consumed)][self.offset :]
            taken.append(doc[:room])
            if len(doc) > room:
                self.offset += room
                break
            room -= len(doc)
            self.consumed, self.offset = self.consumed + 1, 0
        return taken, rest

    def _take_rows(self) -> tuple[dict, int, dict]:
        """link_across_steps: one micro-batch of per-row streams (see the class docstring),
        group micro % stream_groups' rows: (arrays with "continues" (rows, 1), documents begun
        in it, the report's numbers)."""
        shape = (self.batch_size, self.seq_len)
        arrays = {k: np.zeros(shape, bool if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
        continues = np.zeros((self.batch_size, 1), bool)
        begun = 0
        first = (self.micro % self.stream_groups) * self.batch_size
        self.micro += 1
        for r, row in enumerate(self.rows[first : first + self.batch_size]):
            continues[r] = row[0] >= 0
            col = segment = 0
            while col < self.seq_len:
                if row[0] < 0:  # the row's document ended: pull the stream's next one
                    if not self.wrap and self.consumed >= len(self.pieces):
                        break  # a stream without wrap-around is used up: padding
                    row[:] = [self.consumed, 0, 0]
                    self.consumed += 1
                    begun += 1
                doc = self.pieces[self._index(row[0])]
                take = min(self.seq_len - col, len(doc) - row[1])
                segment += 1
                span = slice(col, col + take)
                arrays["tokens"][r, span] = doc[row[1] : row[1] + take]
                arrays["segment_ids"][r, span] = segment
                # Every token but the document's last predicts the next, wherever that sits.
                following = doc[row[1] + 1 : row[1] + take + 1]
                arrays["targets"][r, col : col + len(following)] = following
                arrays["loss_mask"][r, col : col + len(following)] = True
                row[1] += take
                row[2] += 1
                self.longest = max(self.longest, row[2])
                col += take
                if row[1] == len(doc):
                    row[:] = [-1, 0, 0]
        arrays["continues"] = continues
        stats = dict(continuing=int(continues.sum()), longest_document=self.longest)
        return arrays, begun, stats

    def _micro(self):
        if self.long_docs == "link_across_steps":
            return self._take_rows()
        if self.long_docs == "link":
            seqs, rest = self._take_stream()
            if not seqs:  # a stream without wrap-around is used up: an all-padding micro-batch
                shape = (self.batch_size, self.seq_len)
                arrays = {
                    k: np.zeros(shape, bool if k == "loss_mask" else np.int32) for k in BATCH_KEYS
                }
                arrays["continues"] = np.zeros((self.batch_size, 1), bool)
                return arrays, 0, dict(linked=0, longest_chain=0)
            b = pack_stream(seqs, self.seq_len, num_rows=self.batch_size)
            arrays = {k: np.asarray(getattr(b, k)) for k in BATCH_KEYS}
            # (rows, 1): shaped like the (rows, length) arrays' leading axes, so the batch
            # shards as they do. Row 0's flag (a rest of a document) is read as False by the ops.
            arrays["continues"] = np.asarray(b.continues).copy()[:, None]
            arrays["continues"][0] = rest
            links = dict(linked=b.num_linked_sequences, longest_chain=b.longest_chain)
            return arrays, len(seqs), links
        if self.mode == "packed":
            seqs = self._take_packed()
            b = pack_sequences(
                seqs, self.seq_len, policy=self.pack_policy, num_rows=self.batch_size
            )
        elif self.mode == "padded":
            seqs = [self.pieces[self._index(self.consumed + i)] for i in range(self.batch_size)]
            self.consumed += self.batch_size
            b = pad_sequences(seqs, self.seq_len)
        else:
            seqs = [self.pieces[self._index(self.consumed)]]
            self.consumed += 1
            bucket = self.single_bucket
            length = min(self.seq_len, max(2, -(-len(seqs[0]) // bucket) * bucket))
            b = pad_sequences(seqs, length)
        return {k: np.asarray(getattr(b, k)) for k in BATCH_KEYS}, len(seqs), None

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        micros, num_seq, links = [], 0, []
        for _ in range(self.grad_accum):
            m, n, link = self._micro()
            micros.append(m)
            num_seq += n
            links.append(link)
        length = max(m["tokens"].shape[1] for m in micros)
        batch = {}
        for k in BATCH_KEYS:
            parts = [np.pad(m[k], ((0, 0), (0, length - m[k].shape[1]))) for m in micros]
            batch[k] = np.stack(parts)
        real = int((batch["segment_ids"] > 0).sum())
        batch_stats = dict(
            real_tokens=real,
            target_tokens=int(batch["loss_mask"].sum()),
            slots=int(batch["tokens"].size),
            sequences=num_seq,
        )
        if self.long_docs != "cut":
            batch["continues"] = np.stack([m["continues"] for m in micros])
        if self.long_docs == "link_across_steps":
            batch_stats.update(
                continuing_rows=sum(x["continuing"] for x in links),
                longest_document_rows=links[-1]["longest_document"],
            )
        elif self.long_docs == "link":
            batch_stats.update(
                linked_documents=sum(x["linked"] for x in links),
                longest_chain=max(x["longest_chain"] for x in links),
            )
        return {"arrays": batch, "stats": batch_stats}


def estimate_efficiency(pieces: list[np.ndarray], config: DataConfig, steps: int = 50) -> dict:
    """Share of slots holding real tokens in each mode over the first `steps` micro-batches
    (packed mode as config.long_docs packs; pieces are whole documents for "link")."""
    out = {}
    link = config.long_docs != "cut"
    for mode in ("packed", "padded", "single"):
        b = Batcher(
            pieces if mode == "packed" or not link else cut_pieces(pieces, config.seq_len),
            mode=mode,
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            seed=config.seed,
            pack_policy=config.pack_policy,
            single_bucket=config.single_bucket,
            long_docs=config.long_docs if mode == "packed" else "cut",
            stream_groups=config.stream_groups if mode == "packed" else 1,
        )
        real = slots = 0
        n = steps if mode != "single" else steps * config.batch_size
        for _ in range(n):
            if mode == "packed" and not link:
                seqs = b._take_packed()
                real += sum(len(s) for s in seqs)
                slots += config.batch_size * config.seq_len
            else:
                s = b._micro()[0]["segment_ids"]
                real += int((s > 0).sum())
                slots += s.size
        out[mode] = real / slots
    return out


def eval_batches(pieces: list[np.ndarray], config: DataConfig) -> list[dict]:
    """Fixed packed eval batches over the held-out pieces (in order, no wrap-around), linked as
    the training batches are (config.long_docs; link_across_steps' are read as link's: each
    eval batch on its own, from a zero state)."""
    if not pieces:
        return []
    long_docs = "link" if config.long_docs == "link_across_steps" else config.long_docs
    b = Batcher(
        pieces,
        mode="packed",
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        pack_policy=config.pack_policy,
        shuffle=False,
        wrap=False,
        long_docs=long_docs,
    )
    out = []
    while (b.consumed < len(pieces) or b.carry) and len(out) < config.eval_batches:
        batch = next(b)
        out.append(batch)
    return out
