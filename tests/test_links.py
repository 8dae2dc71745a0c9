"""Documents longer than a row: initial states of the Mamba1 scan, and rows linked by
`continues` (jax_packmamba/ops/links.py) in both scans and the causal conv.

Oracles: the float64 per-step loop (tests/loops.py) for initial states, and, for links, the
same op run on each document alone as one sequence: a document split over rows must get the
outputs and gradients it gets unsplit. Isolation is bit for bit. Every forward and backward
pass is compiled once (tests/compiled.py) and shared by the tests that vary only data
(document layouts, perturbations, cotangents); the Mamba1 kernel cases pin small chunks
through pick_config so a row crosses chunk edges.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_packmamba.ops import causal_conv1d
from jax_packmamba.ops.selective_scan import selective_scan
from jax_packmamba.ops.ssd_scan import ssd_scan
from jax_packmamba.packing import pack_stream
from pallas_kernels.selective_scan import ScanConfig
from tests.compiled import compiled, compiled_vjp
from tests.gpu import on_gpu
from tests.loops import rel_err, selective_scan_loop

IMPLS = ["reference", "pallas_interpret", on_gpu("pallas")]
EDGE_CONFIG = ScanConfig(block_d=32, bwd_block_d=32, chunk=16, ckpt=8, window=4, unroll=4)
SCAN_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr("pallas_kernels.selective_scan.vjp.pick_config", lambda *a: EDGE_CONFIG)


def jit_once(key, fn):
    """jax.jit(fn) for tests that call it on the same shapes: compiled once per key and shapes
    at CPU's fast compile (tests/compiled.py). key names what fn closes over."""
    return lambda *args: compiled(key, fn, *args)(*args)


def normal(seed, shape, scale=1.0):
    """Normals drawn on the host (no device compile per shape, as eager jax.random has)."""
    x = scale * np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(np.asarray(x, np.float32))


# The trainer at its smallest, two micro-batches a step, for the trainer-level links tests.
TINY_TRAIN = [
    "--model.preset=tiny",
    "--model.n_layer=1",
    "--model.d_model=32",
    "--model.d_state=4",
    "--data.max_documents=6",
    "--data.seq_len=32",
    "--data.batch_size=4",
    "--data.eval_fraction=0",
    "--optim.grad_accum=2",
    "--optim.warmup_steps=1",
    "--optim.lr=1e-2",
    "--run.progress=false",
]


def mamba1_args(batch, length, d_inner=32, d_state=4, seed=0):
    return dict(
        u=normal(seed, (batch, length, d_inner)),
        delta=normal(seed + 1, (batch, length, d_inner), 0.5),
        A=-jnp.exp(normal(seed + 2, (d_inner, d_state), 0.5)),
        B=normal(seed + 3, (batch, length, d_state)),
        C=normal(seed + 4, (batch, length, d_state)),
        D=normal(seed + 5, (d_inner,)),
        z=normal(seed + 6, (batch, length, d_inner)),
        delta_bias=normal(seed + 7, (d_inner,), 0.3),
    )


def ids_from_lengths(lengths_per_row):
    return jnp.asarray(
        np.stack([np.repeat(np.arange(len(ls)), ls) for ls in lengths_per_row]), jnp.int32
    )


_FLOAT64 = {}

# Runs of 1 and chunk-edge boundaries (16, 32): lengths 1 | 15 | 16 and 16 | 1 | 23.
INIT_LENGTHS = [[1, 15, 16], [16, 1, 23]]


@pytest.mark.parametrize("impl", IMPLS)
def test_selective_scan_initial_states_against_float64_loop(impl):
    length = 40
    seg = ids_from_lengths(
        [ls + [length - sum(ls)] if sum(ls) < length else ls for ls in INIT_LENGTHS]
    )
    args = mamba1_args(2, length)
    init = normal(20, (2, 4, 32, 4), 0.5)
    names = list(args) + ["initial_states"]
    primals = list(args.values()) + [init]
    last = [
        [
            int(np.nonzero(np.asarray(seg[b]) == s)[0].max())
            if np.any(np.asarray(seg[b]) == s)
            else -1
            for s in range(4)
        ]
        for b in range(2)
    ]

    def f(*xs):
        kw = dict(zip(names, xs))
        return selective_scan(
            *[kw[n] for n in SCAN_NAMES],
            delta_softplus=True,
            segment_ids=seg,
            initial_states=kw["initial_states"],
            return_final_states=True,
            impl=impl,
        )

    def f64(*xs):
        kw = dict(zip(names, xs))
        y, states = selective_scan_loop(
            *[kw[n] for n in SCAN_NAMES],
            delta_softplus=True,
            segment_ids=seg,
            initial_states=kw["initial_states"],
        )
        final = jnp.stack(
            [
                jnp.stack(
                    [states[b, t] if t >= 0 else jnp.zeros_like(states[b, 0]) for t in last[b]]
                )
                for b in range(2)
            ]
        )
        return y, final

    # Random cotangents of y (2, 40, 32) and the final states (2, 4, 32, 4).
    cts = (normal(11, (2, length, 32)), normal(12, (2, 4, 32, 4)))
    out, grads = compiled_vjp(("initial_states", impl), f, primals, cts)
    if "loop" not in _FLOAT64:  # the same inputs and cotangents for every impl: run it once
        with jax.enable_x64(True):
            primals64 = [np.asarray(p, np.float64) for p in primals]
            cts64 = tuple(np.asarray(c, np.float64) for c in cts)
            out64, grads64 = compiled_vjp("initial_states_loop", f64, primals64, cts64)
            _FLOAT64["loop"] = jax.tree.map(np.asarray, (out64, grads64))
    out64, grads64 = _FLOAT64["loop"]
    errs = {f"out{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(out, out64))}
    errs.update({"d" + n: rel_err(g, g64) for n, g, g64 in zip(names, grads, grads64)})
    print(impl, {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(e < 2e-5 for e in errs.values()), errs
    assert np.abs(np.asarray(grads[-1])).max() > 0  # the initial states do reach the outputs


# ---------------------------------------------------------------- linked rows

ROW = 24
# Document lengths, packed in order into 4 rows of 24: a document over three rows (its middle
# row a single run), pieces of length 1 at a row's end and the next row's start, a document
# exactly one row long that does not continue anything; one document over all four rows.
DOCS = {"chain": [7, 60, 5, 24], "ones": [23, 2, 22, 49], "long": [3, 90, 3]}


def pack(lengths, row=ROW):
    """(ids (b, t), continues (b,), pieces: per document [(row, start, stop)]) from the
    trainer's link packing (jax_packmamba.packing.pack_stream)."""
    batch = pack_stream([np.zeros(n, np.int32) for n in lengths], row)
    assert batch.efficiency == 1.0, "documents must fill the rows"
    pieces = [[] for _ in lengths]
    for seq, _, r, col, n in batch.placements:  # sorted by (sequence, start)
        pieces[seq].append((int(r), int(col), int(col + n)))
    return jnp.asarray(batch.segment_ids), jnp.asarray(batch.continues), pieces


def gather_doc(a, pieces):
    return jnp.concatenate([a[r, lo:hi] for r, lo, hi in pieces], axis=0)[None]


def scan_fn(family, impl):
    if family == "mamba1":

        def f(kw, seg, continues, **extra):
            return selective_scan(
                *[kw[n] for n in SCAN_NAMES],
                delta_softplus=True,
                segment_ids=seg,
                continues=continues,
                impl=impl,
                **extra,
            )

        return f

    def f(kw, seg, continues, **extra):
        return ssd_scan(
            kw["x"],
            kw["dt"],
            kw["A"],
            kw["B"],
            kw["C"],
            kw["D"],
            kw.get("z"),
            kw["dt_bias"],
            dt_softplus=True,
            segment_ids=seg,
            continues=continues,
            chunk_size=16,
            impl=impl,
            **extra,
        )

    return f


def family_args(family, batch, length, seed=0):
    if family == "mamba1":
        return mamba1_args(batch, length, seed=seed), ("A", "D", "delta_bias")
    h, p, g, n = 2, 16, 1, 16
    args = dict(
        x=normal(seed, (batch, length, h, p)),
        dt=normal(seed + 1, (batch, length, h), 0.5),
        A=-jnp.exp(normal(seed + 2, (h,), 0.5)),
        B=normal(seed + 3, (batch, length, g, n)),
        C=normal(seed + 4, (batch, length, g, n)),
        D=normal(seed + 5, (h,)),
        z=normal(seed + 6, (batch, length, h, p)),
        dt_bias=normal(seed + 7, (h,), 0.3),
    )
    if family == "mamba2_ungated":  # as the Mamba2 model calls it (the gate is in its norm)
        del args["z"]
    return args, ("A", "D", "dt_bias")


def conv_fn(impl):
    def f(kw, seg, continues, **extra):
        return causal_conv1d(
            kw["x"],
            kw["weight"],
            kw["bias"],
            segment_ids=seg,
            activation="silu",
            continues=continues,
            impl=impl,
            **extra,
        )

    return f


def conv_args(batch, length, seed=0):
    return dict(
        x=normal(seed, (batch, length, 8)),
        weight=normal(seed + 1, (8, 4)),
        bias=normal(seed + 2, (8,)),
    ), ("weight", "bias")


def outputs_and_grads(key, f, args, ct, *rest):
    """(f(args, *rest), gradients of args under the cotangent ct), compiled once per key and
    shapes: the document layouts and perturbations of a family share one program."""

    def run(args, ct, *rest):
        y, vjp = jax.vjp(lambda a: f(a, *rest), args)
        return y, vjp(ct)[0]

    return compiled(key, run, args, ct, *rest)(args, ct, *rest)


# The documents alone: each at the start of its own row of a whole stream's width, zeros after
# it under a zero cotangent (nothing after a document reaches it, and a zero cotangent adds
# nothing to any gradient), so one program runs every stream's documents.
ALONE_ROWS, ALONE_WIDTH = 4, 4 * ROW


def linked_and_alone(key, f, args, shared, lengths, f_alone):
    """Packed run with links, and every document alone (through f_alone, in one call); both
    with the same random cotangent. Returns (y, grads, y_alone, grads_alone, pieces): document
    i alone is row i of y_alone and of grads_alone's per-token arrays."""
    seg, continues, pieces = pack(lengths)
    assert len(pieces) <= ALONE_ROWS and max(lengths) <= ALONE_WIDTH
    ct = normal(99, args[next(iter(args))].shape)  # y has the shape of u / x
    y, grads = outputs_and_grads(("packed", *key), f, args, ct, seg, continues)

    def alone_rows(a):
        rows = np.zeros((ALONE_ROWS, ALONE_WIDTH, *a.shape[2:]), np.float32)
        for i, doc in enumerate(pieces):
            rows[i, : lengths[i]] = np.asarray(gather_doc(a, doc))[0]
        return jnp.asarray(rows)

    alone_args = {k: v if k in shared else alone_rows(v) for k, v in args.items()}
    y1, g1 = outputs_and_grads(("alone", key[0]), f_alone, alone_args, alone_rows(ct), None, None)
    return y, grads, y1, g1, pieces


CASES = [
    ("mamba1", "reference"),
    ("mamba1", "pallas_interpret"),
    ("mamba2", "reference"),
    # Ungated, as the Mamba2 model runs it (its gate is in the norm after the scan).
    ("mamba2_ungated", "pallas_interpret"),
    ("conv", "xla"),
    ("conv", "pallas_interpret"),
]


def family_fns(family, impl, batch):
    """(f, f_alone, args, shared) of a family: f runs impl, f_alone the reference (the kernels
    are tested equal to it in test_*_impls.py)."""
    if family == "conv":
        return conv_fn(impl), conv_fn("xla"), *conv_args(batch, ROW)
    return scan_fn(family, impl), scan_fn(family, "reference"), *family_args(family, batch, ROW)


@pytest.mark.parametrize("docs", list(DOCS))
@pytest.mark.parametrize("family,impl", CASES)
def test_document_over_rows_equals_document_alone(family, impl, docs):
    # Mamba1's kernel path carries links in its own chunk-state pass; the SSD and conv kernels
    # see them through their initial-state slot and inputs. Every layout on every path: the
    # layouts share one compiled program.
    lengths = DOCS[docs]
    f, f_alone, args, shared = family_fns(family, impl, 4)
    y, grads, y1, g1, pieces = linked_and_alone((family, impl), f, args, shared, lengths, f_alone)
    errs = {}
    for i, (doc, n) in enumerate(zip(pieces, lengths)):
        errs.setdefault("y", []).append(rel_err(gather_doc(y, doc), y1[i : i + 1, :n]))
        for k in args:
            if k not in shared:
                errs.setdefault("d" + k, []).append(
                    rel_err(gather_doc(grads[k], doc), g1[k][i : i + 1, :n])
                )
    for k in shared:  # shared parameters: the packed gradient is the sum over documents
        errs["d" + k] = [rel_err(grads[k], g1[k])]
    worst = {k: max(v) for k, v in errs.items()}
    print(family, impl, docs, {k: f"{v:.1e}" for k, v in worst.items()})
    assert all(v < 1e-5 for v in worst.values()), worst


@pytest.mark.parametrize("family,impl", CASES)
def test_linked_documents_are_isolated_bit_for_bit(family, impl):
    """Perturbing the document that spans three rows leaves every other document's outputs and
    gradients bit-identical; cutting the link changes the continued rows (so links do work)."""
    seg, continues, pieces = pack(DOCS["chain"])
    f, _, args, shared = family_fns(family, impl, 4)
    ct = normal(99, args[next(iter(args))].shape)

    def run(a, links=continues):
        y, grads = outputs_and_grads(("packed", family, impl), f, a, ct, seg, links)
        return grads, y

    g0, y0 = run(args)
    # Only the spanning document's first piece (end of row 0) changes ...
    r0, lo0, hi0 = pieces[1][0]
    first = next(iter(args))  # u or x: (b, t, ...)
    bumped = dict(args, **{first: args[first].at[r0, lo0:hi0].add(0.5)})
    g1, y1 = run(bumped)
    for doc in (0, 2, 3):
        for r, lo, hi in pieces[doc]:
            assert np.array_equal(y0[r, lo:hi], y1[r, lo:hi]), doc
            for k in args:
                if k not in shared:
                    assert np.array_equal(g0[k][r, lo:hi], g1[k][r, lo:hi]), (doc, k)
    # ... and its piece in the next row sees it (across a whole row the states decay too far
    # for float32 to show it; the float64-free equality test above covers three rows).
    r, lo, hi = pieces[1][1]
    assert not np.array_equal(y0[r, lo:hi], y1[r, lo:hi])
    _, y_cut = run(args, jnp.zeros_like(continues))
    assert not np.array_equal(y0[pieces[1][1][0]], y_cut[pieces[1][1][0]])


def test_bad_continues_are_refused_before_any_work():
    args = mamba1_args(2, 8)
    with pytest.raises(ValueError, match=r"continues must have shape \(batch,\) = \(2,\)"):
        selective_scan(*args.values(), continues=jnp.zeros((3,), bool))
    with pytest.raises(ValueError, match="continues must be a bool array"):
        selective_scan(*args.values(), continues=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"continues\[0\] must be False"):
        selective_scan(*args.values(), continues=jnp.asarray([True, False]))
    with pytest.raises(ValueError, match="initial_states must be"):
        selective_scan(*args.values(), initial_states=jnp.zeros((2, 1, 32, 5)))


# ---------------------------------------------------------------- the trainer's batches


def test_link_batcher_streams_every_token_once_and_resumes_exactly():
    from train.data import Batcher

    long_docs = "link"

    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 255, size=n).astype(np.int32) for n in [5, 70, 1, 33, 200, 9, 16]]
    kw = dict(
        mode="packed",
        seq_len=16,
        batch_size=3,
        grad_accum=2,
        seed=1,
        shuffle=False,
        long_docs=long_docs,
    )
    batcher = Batcher(docs, wrap=False, **kw)
    stream, rests = [], []
    while batcher.consumed < len(docs):
        batch = next(batcher)
        arrays = batch["arrays"]
        for a in range(2):
            real = arrays["segment_ids"][a] > 0
            stream.append(arrays["tokens"][a][real])
            rests.append(bool(arrays["continues"][a, 0]))
    np.testing.assert_array_equal(np.concatenate(stream), np.concatenate(docs))
    # 2 * 3 * 16 = 96 tokens a batch: the 70-token and 200-token documents overflow batches.
    assert any(rests)
    # Resume: a fresh Batcher restored from the state after one batch gives the same batches.
    first = Batcher(docs, **kw)
    next(first)
    state = first.state()
    want = [next(first)["arrays"] for _ in range(3)]
    resumed = Batcher(docs, **kw)
    resumed.restore(state)
    for w in want:
        got = next(resumed)["arrays"]
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])


def row_streams(batches, rows, groups=1):
    """Each row stream's documents, rebuilt from per-row-stream micro-batches: (tokens,
    targets, loss_mask) per document, a piece at a row's start joined to its stream's previous
    piece where the row's flag says it continues. With stream groups, micro-batch m (counted
    over the batches) row r is stream (m mod groups) * rows + r."""
    docs = [[] for _ in range(groups * rows)]
    m = 0
    for arrays in batches:
        for a in range(arrays["tokens"].shape[0]):
            for r in range(rows):
                stream = docs[(m % groups) * rows + r]
                seg = arrays["segment_ids"][a, r]
                for i, s in enumerate(np.unique(seg[seg > 0])):
                    at = seg == s
                    piece = [arrays[k][a, r][at] for k in ("tokens", "targets", "loss_mask")]
                    if i == 0 and arrays["continues"][a, r, 0]:
                        stream[-1] = [np.concatenate(x) for x in zip(stream[-1], piece)]
                    else:
                        stream.append(piece)
            m += 1
    return docs


def check_row_streams(rebuilt, docs, order):
    """Every document once, whole, its true targets, in stream order within its row stream
    (a wrong flag, or a link between two streams, would make a non-document); returns each
    stream's document indices."""
    seen, streams = [], []
    for row in rebuilt:
        index = [next(i for i, d in enumerate(docs) if np.array_equal(d, t)) for t, _, _ in row]
        assert [order.index(i) for i in index] == sorted(order.index(i) for i in index)
        for i, (_, targets, mask) in zip(index, row):
            np.testing.assert_array_equal(targets[:-1], docs[i][1:])
            assert mask[:-1].all() and not mask[-1]
        seen += index
        streams.append(index)
    assert sorted(seen) == list(range(len(docs)))
    return streams


def assert_restored_batches(batcher, state, want):
    """`batcher`, restored to `state`, gives the batches `want` again, array for array."""
    batcher.restore(state)
    for w in want:
        got = next(batcher)
        assert got["stats"] == w["stats"]
        for k in w["arrays"]:
            np.testing.assert_array_equal(got["arrays"][k], w["arrays"][k])


def test_row_stream_batcher_streams_every_document_whole_in_its_row_and_resumes():
    """link_across_steps: every row is a stream of whole documents taken from the shared
    stream in its order; over an epoch every token of every document appears once, in order,
    in one row; the flags join exactly the pieces of one document; every token but a
    document's last has its true target (also across micro-batch edges); a fresh Batcher
    restored mid-document gives the same batches."""
    from train.data import Batcher

    rng = np.random.default_rng(5)
    lengths = [5, 70, 1, 33, 200, 9, 16, 48, 1, 2, 64, 17, 130, 3]
    docs = [rng.integers(0, 255, size=n).astype(np.int32) for n in lengths]
    kw = dict(mode="packed", seq_len=16, batch_size=3, grad_accum=2, seed=1)
    kw.update(long_docs="link_across_steps")
    batcher = Batcher(docs, wrap=False, **kw)
    order = [batcher._index(g) for g in range(len(docs))]  # the shared stream's documents
    batches = []
    while batcher.consumed < len(docs) or any(g >= 0 for g, _, _ in batcher.rows):
        batches.append(next(batcher)["arrays"])
    # Every document once, each whole (row_streams joins a flagged piece to its own row's
    # previous one: a wrong flag, or a link between rows, would make a non-document).
    check_row_streams(row_streams(batches, 3), docs, order)
    flags = np.stack([b["continues"][..., 0] for b in batches])
    assert flags[0, 0].sum() == 0 and flags.sum() >= 6  # the first rows start fresh
    # Resume: after two batches several rows are mid-document; a restored Batcher goes on.
    first = Batcher(docs, **kw)
    for _ in range(2):
        next(first)
    state = first.state()
    assert sum(offset > 0 for _, offset, _ in state["rows"]) >= 2, state
    want = [next(first) for _ in range(4)]
    assert_restored_batches(Batcher(docs, **kw), state, want)
    with pytest.raises(ValueError, match="one stream per row"):
        Batcher(docs, **kw).restore({"consumed": 3, "offset": 4})


def test_stream_groups_batcher_serves_group_m_mod_g_and_resumes():
    """link_across_steps with stream_groups=2 (3 rows, 3 micro-batches a step, so groups
    alternate over step edges too): micro-batch m serves group m mod 2's row streams; over
    an epoch every document appears once, whole and in stream order within one stream of
    one group (rebuilt by m mod 2: any other assignment would join pieces of different
    documents); the first two micro-batches start fresh; a Batcher restored after an odd
    number of micro-batches (group 1 next, rows mid-document) repeats the batches."""
    from train.data import Batcher

    rng = np.random.default_rng(6)
    lengths = [5, 70, 1, 33, 200, 9, 16, 48, 1, 2, 64, 17, 130, 3, 40, 25]
    docs = [rng.integers(0, 255, size=n).astype(np.int32) for n in lengths]
    kw = dict(mode="packed", seq_len=16, batch_size=3, grad_accum=3, seed=1)
    kw.update(long_docs="link_across_steps", stream_groups=2)
    batcher = Batcher(docs, wrap=False, **kw)
    order = [batcher._index(g) for g in range(len(docs))]
    batches = []
    while batcher.consumed < len(docs) or any(g >= 0 for g, _, _ in batcher.rows):
        batches.append(next(batcher)["arrays"])
    streams = check_row_streams(row_streams(batches, 3, groups=2), docs, order)
    assert all(streams)  # all six streams got documents
    flags = np.concatenate([b["continues"][..., 0] for b in batches])  # (micro-batches, rows)
    assert flags[:2].sum() == 0 and flags[2:].sum() >= 6
    # Read as one group, the same batches join pieces of different documents.
    with pytest.raises((StopIteration, AssertionError)):
        check_row_streams(row_streams(batches, 3), docs, order)
    first = Batcher(docs, **kw)
    next(first)
    state = first.state()
    assert state["micro"] == 3 and len(state["rows"]) == 6
    assert sum(offset > 0 for _, offset, _ in state["rows"]) >= 3, state
    want = [next(first) for _ in range(3)]
    assert_restored_batches(Batcher(docs, **kw), state, want)
    kw.pop("stream_groups")
    with pytest.raises(ValueError, match=r"one stream per row \(3 rows: 1 group"):
        Batcher(docs, **kw).restore(state)
    with pytest.raises(ValueError, match="stream_groups=2 needs long_docs='link_across_steps'"):
        Batcher(docs, **kw | dict(long_docs="link", stream_groups=2))


# Per-row streams of 3 rows of 8 tokens, 3 micro-batches (shuffle off: documents in this
# order): row 0 holds a 19-token document over all three (ending at the last one's end), row 1
# a length-1 document and two over one edge each, row 2 a 1-token piece after an edge and a
# document going on past the last micro-batch.
ROWS_DOCS = [5, 19, 1, 4, 10, 9, 6, 7, 3, 12]
ROWS_CONTINUES = [[0, 1, 1], [0, 1, 1], [0, 1, 0]]  # row by row


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_carried_step_gets_each_document_whole_and_rows_are_isolated(family):
    """train.step's carried run over per-row streams: each row's loss is the sum of its
    documents' losses alone (float32), the carry after the last micro-batch is the end state
    of each row's last document alone (a whole one, and the prefix of one going on), and
    perturbing row 1's document leaves the other rows' losses and carried states bit for bit;
    sum_grads_carried gives the loop's loss and carry."""
    from flax import nnx

    import jax_packmamba as jp
    from train import step as step_lib
    from train.data import Batcher

    config = tiny_model_config(family)
    graph, params = nnx.split(jp.LM(config, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 61, size=n).astype(np.int32) for n in ROWS_DOCS]
    kw = dict(mode="packed", seq_len=8, batch_size=3, grad_accum=3, shuffle=False)
    batcher = Batcher(docs, long_docs="link_across_steps", **kw)
    arrays = next(batcher)["arrays"]
    assert arrays["continues"][..., 0].T.astype(int).tolist() == ROWS_CONTINUES
    rebuilt = row_streams([arrays], 3)
    carried = jit_once(
        ("carried_losses", family),
        lambda p, mb, c: step_lib.carried_losses(graph, p, mb, c, chunk_tokens=16),
    )

    def per_row(arrays):
        """Each row's summed loss over the micro-batches (others masked out), and the carry."""
        out = []
        for r in range(3):
            carry = step_lib.init_carry(config, 3)
            total = 0.0
            for a in range(3):
                mb = {k: jnp.asarray(v[a]) for k, v in arrays.items()}
                mb["loss_mask"] = mb["loss_mask"].at[jnp.arange(3) != r].set(False)
                ce, (_, carry) = carried(params, mb, carry)
                total += float(ce)
            out.append(total)
        return np.array(out), carry

    losses, carry = per_row(arrays)
    # A document alone: one row of 24, padding first (its own run), so every document is one
    # compiled shape and is the row's last run (whose end state the call returns).
    alone_call = jit_once(
        ("rows_alone", family),
        lambda *a: nnx.merge(graph, params).cross_entropy(*a, return_end_state=True),
    )

    def alone_run(tokens, targets, mask):
        pad = 24 - len(tokens)
        seg = np.r_[np.zeros(pad, np.int32), np.ones(len(tokens), np.int32)]
        rows = [np.r_[np.zeros(pad, x.dtype), x][None] for x in (tokens, targets, mask)]
        return alone_call(rows[0], seg[None], rows[1], rows[2])

    for r, row in enumerate(rebuilt):
        alone = 0.0
        for piece in row:
            ce, _, end = alone_run(*piece)
            alone += float(ce)
        assert abs(losses[r] - alone) <= 1e-5 * abs(alone), (r, losses[r], alone)
        # Each row's last document ends with the row (rows 0, 1 whole, row 2 a prefix).
        for k, v in end._asdict().items():
            assert rel_err(carry[k][:, r], v[:, 0]) < 1e-5, (r, k)
    assert not np.array_equal(losses, np.zeros(3))
    if family == "mamba2":
        return  # what follows is the step's own code, the same for both families
    # sum_grads_carried: the same loss and carry in one scan over the micro-batches.
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    _, ce_sum, count, end_carry = jit_once(
        ("rows_sum", family),
        lambda p, b, c: step_lib.sum_grads_carried(graph, p, b, c, chunk_tokens=16),
    )(params, batch, step_lib.init_carry(config, 3))
    assert abs(float(ce_sum) - losses.sum()) <= 1e-5 * losses.sum()
    assert int(count) == int(arrays["loss_mask"].sum())
    for k in carry:
        assert rel_err(end_carry[k], carry[k]) < 1e-5
    # Isolation: a token of row 1's first micro-batch changed.
    perturbed = {k: v.copy() for k, v in arrays.items()}
    perturbed["tokens"][0, 1, 5] = (perturbed["tokens"][0, 1, 5] + 1) % 61
    losses2, carry2 = per_row(perturbed)
    assert losses2[1] != losses[1]
    for r in (0, 2):
        assert losses2[r] == losses[r]
        for k in carry:
            np.testing.assert_array_equal(carry2[k][:, r], carry[k][:, r])


# Two groups of 2 row streams of 8 tokens, 4 micro-batches (shuffle off): group 0 serves
# micro-batches 0 and 2, group 1 micro-batches 1 and 3. Among the streams: a document over both
# of its group's micro-batches, a 1-token piece after the edge, a length-1 document, a
# document ending exactly at the last micro-batch's end, documents going on past it.
GROUPS_DOCS = [11, 3, 1, 6, 9, 16, 4, 2, 5, 7, 13, 8, 10, 6]


def test_carried_step_with_stream_groups_serves_one_group_at_a_time():
    """--data.stream_groups=2 (mamba1, float32): micro-batch m runs from group m mod 2's
    carried states (train.step.grouped_carried_losses) and writes back only those: the other
    group's states are unchanged bit for bit after every micro-batch. Each row stream's
    summed loss is the sum of its documents' losses alone, its carried state the end state of
    its last document alone, and sum_grads_carried's scan gives the same loss and carry."""
    from flax import nnx

    import jax_packmamba as jp
    from train import step as step_lib
    from train.data import Batcher

    config = tiny_model_config("mamba1")
    graph, params = nnx.split(jp.LM(config, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 61, size=n).astype(np.int32) for n in GROUPS_DOCS]
    kw = dict(mode="packed", seq_len=8, batch_size=2, grad_accum=4, shuffle=False)
    batcher = Batcher(docs, long_docs="link_across_steps", stream_groups=2, **kw)
    arrays = next(batcher)["arrays"]
    flags = arrays["continues"][..., 0].astype(int).tolist()
    assert flags == [[0, 0], [0, 0], [1, 1], [1, 1]]
    rebuilt = row_streams([arrays], 2, groups=2)  # streams g * 2 + r
    step = jit_once(
        "groups_step",
        lambda p, mb, c: step_lib.grouped_carried_losses(graph, p, mb, c, chunk_tokens=16),
    )
    zero = jax.device_get(step_lib.init_carry(config, 2, groups=2))
    assert zero["ssm"].shape[:3] == (2, config.n_layer, 2) and int(zero["next_group"]) == 0
    states = ("conv", "ssm")
    losses, carry = [], zero
    for stream in range(4):  # each stream's loss alone: the other rows' targets masked out
        g, r = divmod(stream, 2)
        carry, total = zero, 0.0
        for a in range(4):
            mb = {k: v[a] for k, v in arrays.items()}
            mine = (np.arange(2) == r) & (a % 2 == g)
            mb["loss_mask"] = mb["loss_mask"] & mine[:, None]
            ce, (_, new) = jax.device_get(step(params, mb, carry))
            assert int(new["next_group"]) == (a + 1) % 2
            for k in states:  # the group not served: bit for bit; the served one: moved on
                np.testing.assert_array_equal(new[k][1 - a % 2], carry[k][1 - a % 2])
                assert not np.array_equal(new[k][a % 2], carry[k][a % 2])
            carry, total = new, total + float(ce)
        losses.append(total)
    alone_call = jit_once(
        "groups_alone", lambda *a: nnx.merge(graph, params).cross_entropy(*a, return_end_state=True)
    )
    for stream, row in enumerate(rebuilt):
        g, r = divmod(stream, 2)
        alone = 0.0
        for tokens, targets, mask in row:  # padding first: the document is the row's last run
            pad = 16 - len(tokens)
            seg = np.r_[np.zeros(pad, np.int32), np.ones(len(tokens), np.int32)]
            x = [np.r_[np.zeros(pad, v.dtype), v][None] for v in (tokens, targets, mask)]
            ce, _, end = alone_call(x[0], seg[None], x[1], x[2])
            alone += float(ce)
        assert abs(losses[stream] - alone) <= 1e-5 * abs(alone), (stream, losses, alone)
        for k, v in end._asdict().items():  # the carry was the same for every stream's pass
            assert rel_err(carry[k][g, :, r], v[:, 0]) < 1e-5, (stream, k)
    _, ce_sum, count, end_carry = jit_once(
        "groups_sum", lambda p, b, c: step_lib.sum_grads_carried(graph, p, b, c, chunk_tokens=16)
    )(params, arrays, zero)
    assert abs(float(ce_sum) - sum(losses)) <= 1e-5 * sum(losses)
    assert int(count) == int(arrays["loss_mask"].sum()) and int(end_carry["next_group"]) == 0
    for k in states:
        assert rel_err(end_carry[k], carry[k]) < 1e-5


# ---------------------------------------------------------------- the models


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_model_document_over_rows_gets_its_logits_and_gradients_alone(family):
    """Both families, reference ops, float32: a packed stream with links gets every document's
    logits as it alone, and the parameters' gradient of a loss over all documents is the sum
    of their gradients alone."""
    from flax import nnx

    import jax_packmamba as jp

    config = tiny_model_config(family)
    graph, params = nnx.split(jp.LM(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 61, size=n).astype(np.int32) for n in DOCS["chain"]]
    batch = pack_stream(docs, ROW)
    tokens, seg = jnp.asarray(batch.tokens), jnp.asarray(batch.segment_ids)
    continues = jnp.asarray(batch.continues)
    ct = normal(5, (*tokens.shape, config.padded_vocab_size))

    def logits_and_grads(tokens, seg, continues, ct):
        def run(params, tokens, seg, continues, ct):
            call = lambda p: nnx.merge(graph, p)(tokens, seg, continues=continues)  # noqa: E731
            logits, vjp = jax.vjp(call, params)
            return logits, vjp(ct)[0]

        key = ("model", family)
        return compiled(key, run, params, tokens, seg, continues, ct)(
            params, tokens, seg, continues, ct
        )

    logits, grads = logits_and_grads(tokens, seg, continues, ct)
    _, _, pieces = pack(DOCS["chain"])
    # Every document alone: each at the start of its own row, padding after it (one call for
    # all, not a compile per length; that padding never reaches a document is the isolation
    # tests' subject). The parameters' gradient of the rows' summed loss is the sum of the
    # documents' gradients alone.
    width = max(map(len, docs))
    alone_ids = np.zeros((len(docs), width), np.int32)
    alone_seg = np.ones((len(docs), width), np.int32)
    alone_ct = np.zeros((len(docs), width, config.padded_vocab_size), np.float32)
    for i, (doc, where) in enumerate(zip(docs, pieces)):
        alone_ids[i, : len(doc)], alone_seg[i, : len(doc)] = doc, 0
        alone_ct[i, : len(doc)] = np.asarray(gather_doc(ct, where))[0]
    alone_ids, alone_seg, alone_ct = map(jnp.asarray, (alone_ids, alone_seg, alone_ct))
    alone, total = logits_and_grads(alone_ids, alone_seg, None, alone_ct)
    errs = [
        rel_err(gather_doc(logits, where), alone[i : i + 1, : len(doc)])
        for i, (doc, where) in enumerate(zip(docs, pieces))
    ]
    grad_errs = [rel_err(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(total))]
    print(family, f"logits {max(errs):.1e} grads {max(grad_errs):.1e}")
    assert max(errs) < 1e-5 and max(grad_errs) < 1e-5, (errs, grad_errs)
    # Without the links (every row cut: the same program) the continued rows differ.
    cut, _ = logits_and_grads(tokens, seg, jnp.zeros_like(continues), ct)
    assert not np.array_equal(cut[1], logits[1])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_model_64k_document_over_32_rows_equals_one_64k_sequence(family):
    """The issue's own case at its own size: one 65,536-token document laid over 32 linked rows
    of 2048 gets the logits and parameter gradients (random cotangent) it gets as one 65,536-
    token sequence; reference ops, float32, one layer."""
    import dataclasses

    from flax import nnx

    import jax_packmamba as jp

    config = dataclasses.replace(tiny_model_config(family), n_layer=1)
    if family == "mamba2":
        config = dataclasses.replace(config, chunk_size=64)
    graph, params = nnx.split(jp.LM(config, rngs=nnx.Rngs(0)))
    rows, width = 32, 2048
    doc = np.random.default_rng(1).integers(0, 61, size=rows * width).astype(np.int32)
    ct = normal(5, (rows, width, config.padded_vocab_size))

    def run(params, tokens, continues, ct):
        call = lambda p: nnx.merge(graph, p)(tokens, None, continues=continues)  # noqa: E731
        logits, vjp = jax.vjp(call, params)
        return logits, vjp(ct)[0]

    linked = (params, jnp.asarray(doc.reshape(rows, width)), jnp.arange(rows) > 0, ct)
    logits, grads = compiled(("64k linked", family), run, *linked)(*linked)
    one = (params, jnp.asarray(doc[None]), ct.reshape(1, rows * width, -1))
    whole = lambda p, t, c: run(p, t, None, c)  # noqa: E731
    logits1, grads1 = compiled(("64k one", family), whole, *one)(*one)
    err = rel_err(logits.reshape(logits1.shape), logits1)
    grad_err = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)))
    print(family, f"logits {err:.1e} grads {grad_err:.1e}")
    assert err < 1e-5 and grad_err < 1e-5, (err, grad_err)


def test_trainer_links_long_documents_end_to_end(tmp_path, capsys):
    """--data.long_docs=link trains (stdlib files are mostly longer than a 64-token row), reports
    the linked documents and the longest chain, and resumes to the same losses."""
    from train.__main__ import main
    from train.metrics import read_metrics

    tiny = [
        "--model.preset=tiny",
        "--model.n_layer=1",
        "--model.d_model=32",
        "--model.d_state=4",
        "--data.max_documents=12",
        "--data.seq_len=64",
        "--data.batch_size=4",
        "--data.eval_batches=1",
        "--optim.warmup_steps=2",
        "--run.progress=false",
        "--data.long_docs=link",
        "--run.eval_every=3",
        "--run.checkpoint_every=2",
        "--optim.lr=1e-2",
    ]
    out = tmp_path / "run"
    assert main(tiny + ["--run.steps=4", f"--run.out_dir={out}"]) == 0
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["linked_documents"] >= 1 and r["longest_chain"] >= 2 for r in records)
    assert all(r["real_tokens"] == r["slots"] for r in records)  # rows filled end to end
    # Resume from step 2 in a copy: steps 3 and 4 repeat bit for bit (the data position
    # includes the offset into a half-used document).
    again = tmp_path / "again"
    shutil.copytree(out, again)
    for newer in (again / "checkpoints" / "4", again / "models" / "4"):
        shutil.rmtree(newer, ignore_errors=True)
    capsys.readouterr()
    assert main(tiny + ["--run.steps=4", f"--run.out_dir={again}"]) == 0
    assert "checkpoints/2 (step 2" in capsys.readouterr().out  # it resumed at step 2
    resumed = {r["step"]: r["loss"] for r in read_metrics(again / "metrics.jsonl") if "loss" in r}
    assert [resumed[s] for s in (3, 4)] == [r["loss"] for r in records[2:]]


# ---------------------------------------------------------------- across batches

# Streams of 8 rows of 24, run as two batches of 4 rows (the models), and of 4 rows, run as two
# batches of 2 (the ops: the one-batch side is then the layouts' program): a document over the
# batch edge (from the first row into the last), a piece of length 1 at batch 1's end, a document
# ending exactly at the edge.
ACROSS = {"long": [7, 150, 20, 15], "one": [95, 97], "edge": [96, 96]}
ACROSS_OPS = {"long": [7, 75, 14], "one": [47, 49], "edge": [48, 48]}


def batch_fn(family, f):
    """f on a batch whose row 0 starts from `start` (first_run_states / first_inputs), returning
    (outputs, each row's last-run end state)."""
    from jax_packmamba.ops.links import last_run_inputs

    def g(kw, seg, continues, start):
        if family == "conv":
            y = f(kw, seg, continues, first_inputs=start)
            return y, last_run_inputs(kw["x"], seg, kw["weight"].shape[1])
        # The kernels read each row's end from their passes between chunks.
        return f(kw, seg, continues, return_row_end_states=True, first_run_states=start)

    return g


def start_shape(family, args, batch):
    if family == "conv":
        return (batch, args["weight"].shape[1] - 1, args["x"].shape[2])
    if family == "mamba1":
        return (batch, *args["A"].shape)
    return (batch, *args["x"].shape[2:], args["B"].shape[3])


@pytest.mark.parametrize("stream", list(ACROSS_OPS))
@pytest.mark.parametrize("family,impl", CASES)
def test_state_carried_into_the_next_batch_equals_one_batch(family, impl, stream):
    """Two batches of 2 rows, batch 1's last row's end state given as batch 2's row 0 start
    (first_run_states / first_inputs), get what one linked batch of 4 rows gets: outputs, and
    the gradients of batch 2's inputs (truncated backprop: nothing flows back into batch 1)."""
    if impl == "pallas_interpret" and family == "conv":
        # The scan kernels take links and a carried start each their own way (Mamba1's in its
        # chunk-state pass, the SSD's in its state passing and chunk 0's start); the conv
        # kernels read both through the same prefix.
        pytest.skip("the conv's prefix is tested in test_causal_conv1d_impls.py")
    lengths, h = ACROSS_OPS[stream], 2
    seg, continues, _ = pack(lengths)
    f, _, args, shared = family_fns(family, impl, 2 * h)
    batch = batch_fn(family, f)
    ct = normal(99, args[next(iter(args))].shape)
    half = {k: v if k in shared else v[:h] for k, v in args.items()}
    rest = {k: v if k in shared else v[h:] for k, v in args.items()}
    zero_start = jnp.zeros(start_shape(family, args, h), jnp.float32)
    no_ct = (jnp.zeros_like(ct[h:]), zero_start)  # batch 1: its outputs only
    key = ("batch", family, impl)
    (_, end), _ = outputs_and_grads(key, batch, half, no_ct, seg[:h], continues[:h], zero_start)
    rest_flag = bool(continues[h])
    assert rest_flag == (stream != "edge")
    start = zero_start.at[0].set(jnp.where(rest_flag, end[h - 1], 0.0))
    links2 = continues[h:].at[0].set(False)
    # One batch of 4 rows (the layouts' program); only batch 2's outputs have a cotangent.
    y_one, g_one = outputs_and_grads(
        ("packed", family, impl), f, args, ct.at[:h].set(0.0), seg, continues
    )
    (y_two, _), g_two = outputs_and_grads(
        key, batch, rest, (ct[h:], zero_start), seg[h:], links2, start
    )
    errs = {"y": rel_err(y_two, y_one[h:])}
    errs.update({"d" + k: rel_err(g_two[k], g_one[k][h:]) for k in args if k not in shared})
    print(family, impl, stream, {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(v < 1e-5 for v in errs.values()), errs
    if stream != "edge":  # the carried state matters: a zero start differs
        (y_zero, _), _ = outputs_and_grads(
            key, batch, rest, (ct[h:], zero_start), seg[h:], links2, zero_start
        )
        assert not np.array_equal(y_zero[0], y_one[h])


# The link_across_steps trainer run that both the resume test and the two-device test compare
# against: 4 steps of 2 micro-batches, a checkpoint every 2. Tests copy it, never write into it.
ACROSS_STEPS_TRAIN = TINY_TRAIN + [
    "--run.checkpoint_every=2",
    "--run.steps=4",
    "--data.long_docs=link_across_steps",
    "--data.stream_groups=1",
]


@pytest.fixture(scope="module")
def across_steps_run(tmp_path_factory):
    from train.__main__ import main

    out = tmp_path_factory.mktemp("across_steps") / "straight"
    assert main(ACROSS_STEPS_TRAIN + [f"--run.out_dir={out}"]) == 0
    return out


def test_trainer_carries_documents_across_steps_and_resumes_exactly(
    tmp_path, capsys, across_steps_run
):
    """--data.long_docs=link_across_steps (2 micro-batches a step): 4 steps straight, and 2
    steps, a checkpoint, a resume and 2 more, give the same losses and parameters bit for bit,
    with documents going on over every micro-batch and step edge (stdlib files are longer than
    a 4 x 32-token micro-batch); the carried state matters (link's losses differ)."""
    from train.__main__ import main
    from train.checkpoint import Checkpointer
    from train.metrics import read_metrics

    tiny = TINY_TRAIN + ["--run.checkpoint_every=2", "--run.steps=4"]

    def losses(out):
        return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]

    def exported(out):
        folder = out / "models" / "4"
        return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}

    straight, link = across_steps_run, tmp_path / "link"
    assert main(tiny + ["--data.long_docs=link", "--run.steps=2", f"--run.out_dir={link}"]) == 0
    # link cuts at every micro-batch edge (its rest starts from zeros): already in step 1.
    assert all(a != b for a, b in zip(losses(straight), losses(link)))
    halves = tmp_path / "halves"
    shutil.copytree(straight, halves)
    for newer in (halves / "checkpoints" / "4", halves / "models" / "4"):
        shutil.rmtree(newer)
    capsys.readouterr()
    # Resumed with --data.long_docs and --data.stream_groups at their auto defaults: the run
    # keeps its own choice (link_across_steps, one group).
    assert main(tiny + [f"--run.out_dir={halves}"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoints/2 (step 2" in printed  # it resumed at step 2
    assert "auto: the resumed run's choice" in printed
    resumed = {r["step"]: r["loss"] for r in read_metrics(halves / "metrics.jsonl") if "loss" in r}
    assert [resumed[s] for s in (3, 4)] == losses(straight)[2:]
    assert exported(halves) == exported(straight)
    # The save it resumed from had several rows in the middle of a document (per-row streams).
    ckpt = Checkpointer(halves / "checkpoints", 3)
    rows = ckpt.read_meta(2)["data"]["rows"]
    ckpt.close()
    assert len(rows) == 4 and sum(offset > 0 for _, offset, _ in rows) >= 2, rows
    records = [r for r in read_metrics(straight / "metrics.jsonl") if "loss" in r]
    assert all(r["continuing_rows"] >= 1 and r["longest_document_rows"] >= 2 for r in records)


def test_trainer_with_stream_groups_resumes_exactly(tmp_path, capsys):
    """--data.stream_groups=2 with 3 micro-batches a step: 4 steps straight, and 3 steps, a
    checkpoint, a resume and 1 more, give the same losses and exported parameters bit for bit.
    At step 3 the next micro-batch serves group 1 (9 served; after an even count of steps
    it would be group 0 for any grad_accum), with streams of both groups mid-document."""
    from train.__main__ import main
    from train.checkpoint import Checkpointer
    from train.metrics import read_metrics

    tiny = TINY_TRAIN + [
        "--optim.grad_accum=3",
        "--data.long_docs=link_across_steps",
        "--data.stream_groups=2",
        "--run.checkpoint_every=3",
        "--run.steps=4",
    ]

    def losses(out):
        return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}

    def exported(out):
        folder = out / "models" / "4"
        return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}

    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert main(tiny + [f"--run.out_dir={straight}"]) == 0
    shutil.copytree(straight, halves)
    for newer in (halves / "checkpoints" / "4", halves / "models" / "4"):
        shutil.rmtree(newer)
    capsys.readouterr()
    assert main(tiny + [f"--run.out_dir={halves}"]) == 0
    assert "checkpoints/3 (step 3" in capsys.readouterr().out
    assert losses(halves)[4] == losses(straight)[4]
    assert exported(halves) == exported(straight)
    ckpt = Checkpointer(halves / "checkpoints", 3)
    data = ckpt.read_meta(3)["data"]
    ckpt.close()
    assert data["micro"] == 9 and len(data["rows"]) == 8
    for group in (data["rows"][:4], data["rows"][4:]):
        assert any(offset > 0 for _, offset, _ in group), data["rows"]


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_model_end_state_carried_into_the_next_call_equals_one_call(family):
    """model(..., return_end_state=True)'s last row, given as the next call's row 0
    start_state, gives the logits one linked call over both batches gives (both families,
    reference ops, a document over the batch edge and a piece of length 1 at it)."""
    from flax import nnx

    import jax_packmamba as jp
    from jax_packmamba.layers import MixerState
    from jax_packmamba.model import end_state_like

    config = tiny_model_config(family)
    graph, params = nnx.split(jp.LM(config, rngs=nnx.Rngs(0)))

    def call(tokens, seg, continues, start_state=None, return_end_state=False):
        def fn(params, tokens, seg, continues, start_state):
            model = nnx.merge(graph, params)
            return model(
                tokens,
                seg,
                continues=continues,
                start_state=start_state,
                return_end_state=return_end_state,
            )

        args = (params, tokens, seg, continues, start_state)
        return compiled(("model_call", family, return_end_state), fn, *args)(*args)

    rng = np.random.default_rng(0)
    errs = []
    for lengths in (ACROSS["long"], ACROSS["one"]):
        docs = [rng.integers(0, 61, size=n).astype(np.int32) for n in lengths]
        batch = pack_stream(docs, ROW)
        tokens, seg = jnp.asarray(batch.tokens), jnp.asarray(batch.segment_ids)
        continues = jnp.asarray(batch.continues)
        whole = call(tokens, seg, continues)
        first, end = call(tokens[:4], seg[:4], continues[:4], return_end_state=True)
        assert jax.tree.map(jnp.shape, end) == jax.tree.map(jnp.shape, end_state_like(config, 4))
        assert rel_err(first, whole[:4]) < 1e-6  # the first call's logits are unchanged
        start = jax.tree.map(lambda e: jnp.zeros_like(e).at[:, 0].set(e[:, -1]), end)

        def second(start):
            links = continues[4:].at[0].set(False)
            return call(tokens[4:], seg[4:], links, start_state=MixerState(*start))

        errs.append(rel_err(second(start), whole[4:]))
        # The carried state matters: a zero start (the same program) gives other logits.
        assert not np.array_equal(second(start)[0], second(jax.tree.map(jnp.zeros_like, start))[0])
    print(family, [f"{e:.1e}" for e in errs])
    assert max(errs) < 1e-5, errs
    with pytest.raises(ValueError, match=r"start_state.conv must have shape \(2, 4, "):
        bad = end_state_like(config, 3)
        nnx.merge(graph, params)(tokens[:4], seg[:4], start_state=bad)


def tiny_model_config(family):
    import jax_packmamba as jp

    if family == "mamba1":
        return jp.MambaConfig.preset(
            "tiny", n_layer=2, d_model=16, vocab_size=61, scan_impl="reference", conv_impl="xla"
        )
    return jp.Mamba2Config.preset(
        "tiny",
        n_layer=2,
        d_model=16,
        d_state=16,
        headdim=8,
        vocab_size=61,
        chunk_size=8,
        scan_impl="reference",
        conv_impl="xla",
    )


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_prefill_of_long_prompts_over_linked_rows_equals_one_row(family):
    """generation.prefill with max_row=16: prompts laid end to end over linked rows (one's last
    piece a single token, so its conv window reaches back a row; one ending at a row's end)
    give the logits and decode state of the one-row prefill."""
    from flax import nnx

    import jax_packmamba as jp
    from jax_packmamba.generation import prefill, prefill_inputs

    config = tiny_model_config(family)
    model = jp.LM(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 61, size=n).astype(np.int32) for n in (33, 5, 26)]
    linked = prefill_inputs(prompts, config, max_row=16)
    assert linked.continues is not None and linked.continues[:4].tolist() == [0, 1, 1, 1]
    assert prefill_inputs(prompts, config).continues is None
    logits, state = prefill(model, prompts)
    logits16, state16 = prefill(model, prompts, max_row=16)
    errs = [rel_err(logits16, logits)]
    errs += [rel_err(a, b) for a, b in zip(jax.tree.leaves(state16), jax.tree.leaves(state))]
    print(family, [f"{e:.1e}" for e in errs])
    assert max(errs) < 1e-5, errs
    with pytest.raises(ValueError, match="max_row must be an int of at least"):
        prefill_inputs(prompts, config, max_row=1)


def test_resume_refuses_to_switch_link_across_steps_on_or_off():
    """The carried state is in link_across_steps' train state only: switching it on or off
    on resume is one clear error, even with --data.allow_change=true."""
    from train.config import ConfigError, check_resume, parse_args

    def config(long_docs):
        return parse_args([f"--data.long_docs={long_docs}", "--data.allow_change=true"])

    for old, new in (("link", "link_across_steps"), ("link_across_steps", "cut")):
        with pytest.raises(ConfigError, match="only link_across_steps' train state holds"):
            check_resume(
                config(old).to_dict(), config(new), old_model=None, new_model={}, checkpoint="c"
            )
    check_resume(
        config("cut").to_dict(), config("link"), old_model=None, new_model={}, checkpoint="c"
    )
    # The explicit reduction carries each device's rows itself (train.step.explicit_grad_sums).
    parse_args(["--data.long_docs=link_across_steps", "--mesh.grad_reduce=bfloat16"])


def test_stream_groups_need_link_across_steps_and_stay_fixed_on_resume():
    """--data.stream_groups: > 1 only with link_across_steps, >= 0 (0: auto), and changing it
    on resume is one clear error (the carry holds that many groups), even with allow_change."""
    from train.config import ConfigError, check_resume, parse_args

    with pytest.raises(ConfigError, match="--data.stream_groups=2 needs --data.long_docs="):
        parse_args(["--data.long_docs=link", "--data.stream_groups=2"])
    with pytest.raises(ConfigError, match="--data.stream_groups must be >= 0"):
        parse_args(["--data.long_docs=link_across_steps", "--data.stream_groups=-1"])

    def config(groups):
        return parse_args(
            [
                "--data.long_docs=link_across_steps",
                f"--data.stream_groups={groups}",
                "--data.allow_change=true",
            ]
        )

    for old, new in ((2, 1), (1, 4)):
        with pytest.raises(ConfigError, match=f"--data.stream_groups={new}: it was written "):
            check_resume(
                config(old).to_dict(), config(new), old_model=None, new_model={}, checkpoint="c"
            )
    old = config(1).to_dict()
    old["data"].pop("stream_groups")  # a checkpoint from before the option: one group
    check_resume(old, config(1), old_model=None, new_model={}, checkpoint="c")
    with pytest.raises(ConfigError, match="was written with 1"):
        check_resume(old, config(2), old_model=None, new_model={}, checkpoint="c")


def test_long_docs_auto_carries_where_it_can_and_a_resumed_run_keeps_its_choice(tmp_path):
    """--data.long_docs=auto (the default): link_across_steps with 8 stream groups where the
    state can be carried, cut (one line saying why) where it cannot; a resumed run keeps the
    choice its out_dir's config.json records (cut for a run from before the option)."""
    from train.config import ConfigError, RunConfig, parse_args, resolve_long_docs
    from train.trainer import recorded_data_config

    def chosen(*flags, recorded=None):
        config, note = resolve_long_docs(parse_args(list(flags)), recorded)
        return config.data.long_docs, config.data.stream_groups, note

    assert chosen() == ("link_across_steps", 8, "auto: no document is cut")
    assert chosen("--data.stream_groups=2")[:2] == ("link_across_steps", 2)
    assert chosen("--mesh.grad_reduce=bfloat16")[:2] == ("link_across_steps", 8)
    for flag, why in (
        ("--data.mode=padded", "--data.mode=padded has no rows to link"),
        ("--model.preset=hybrid-tiny", "hybrid presets cannot link rows yet"),
        ("--model.preset=mamba3-tiny", "Mamba-3 presets cannot link rows yet"),
    ):
        long_docs, groups, note = chosen(flag)
        assert (long_docs, groups) == ("cut", 1) and note.startswith(f"auto: {why}"), note
    with pytest.raises(ConfigError, match="Mamba-3 presets cannot link rows yet"):
        parse_args(["--model.preset=mamba3-tiny", "--data.long_docs=link"])
    with pytest.raises(ConfigError, match=r"stream_groups=2 needs .*auto chose cut: hybrid"):
        chosen("--model.preset=hybrid-tiny", "--data.stream_groups=2")
    # Explicit choices stay; stream_groups=0 is 8 with link_across_steps only.
    assert chosen("--data.long_docs=link_across_steps") == ("link_across_steps", 8, "")
    assert chosen("--data.long_docs=link") == ("link", 1, "")
    assert chosen("--data.long_docs=cut", "--data.stream_groups=1") == ("cut", 1, "")
    resumed = "auto: the resumed run's choice"
    assert chosen(recorded={}) == ("cut", 1, resumed)
    las = {"long_docs": "link_across_steps"}
    assert chosen(recorded=las) == ("link_across_steps", 1, resumed)
    assert chosen(recorded=las | {"stream_groups": 4})[:2] == ("link_across_steps", 4)

    run = RunConfig(out_dir=str(tmp_path))
    assert recorded_data_config(run) is None  # no checkpoints: a new run
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    assert recorded_data_config(run) == {}  # checkpoints, no config.json: from before it
    (tmp_path / "config.json").write_text('{"data": {"long_docs": "link", "seq_len": 32}}')
    assert recorded_data_config(run) == {"long_docs": "link", "seq_len": 32}
    assert recorded_data_config(RunConfig(out_dir=str(tmp_path), resume=False)) is None
    fresh = RunConfig(out_dir=str(tmp_path), resume=True, overwrite=True)
    assert recorded_data_config(fresh) is None


def test_carried_state_is_sharded_as_the_batch_rows():
    """The carry's rows axis (layers, rows, ...) is laid over data x fsdp, as the batch's rows
    (each device holds its own rows' states), whatever fsdp does to the parameters."""
    from jax.sharding import PartitionSpec as P

    from train import sharding
    from train import step as step_lib
    from train.config import OptimConfig

    config = tiny_model_config("mamba1")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1))
    compiled = step_lib.build(config, OptimConfig(), 4, mesh, carry_rows=4)
    carry = compiled.abstract_state.carry
    assert carry["ssm"].shape[:2] == (config.n_layer, 4) and carry["conv"].shape[1] == 4
    for leaf in jax.tree.leaves(compiled.state_shardings.carry):
        assert leaf.spec == P(None, sharding.BATCH_AXES)
    assert sharding.batch_sharding(mesh).spec == P(None, sharding.BATCH_AXES, None)
    # Stream groups: (groups, layers, rows, ...), the group axis whole on every device.
    grouped = step_lib.build(config, OptimConfig(), 4, mesh, carry_rows=4, stream_groups=3)
    carry, specs = grouped.abstract_state.carry, grouped.state_shardings.carry
    assert carry["ssm"].shape[:3] == (3, config.n_layer, 4) and carry["conv"].shape[2] == 4
    assert specs["ssm"].spec == specs["conv"].spec == P(None, None, sharding.BATCH_AXES)
    assert carry["next_group"].shape == () and specs["next_group"].spec == P()


def test_carried_rows_over_two_devices_match_one_device(tmp_path, across_steps_run):
    """link_across_steps under the SPMD partitioner with the rows over two devices (each holds
    its rows' carried states): 4 steps of 2 micro-batches give the one-device run's losses."""
    from tests.test_train import finish, losses, run_cli

    args = ACROSS_STEPS_TRAIN + [
        "--run.plot=false",
        "--run.tensorboard=false",
        "--run.compilation_cache=false",
    ]
    two = finish(run_cli(args + ["--mesh.data=2", f"--run.out_dir={tmp_path / 'two'}"], devices=2))
    assert "2 x cpu" in two and "mesh data=2 fsdp=1" in two
    a, b = losses(tmp_path / "two"), losses(across_steps_run)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([a[k] for k in b], [b[k] for k in b], rtol=2e-5)


# ---------------------------------------------------------------- what the links cost


@pytest.mark.parametrize(
    "family,row_ends",
    [
        ("mamba2", None),
        ("mamba2_ungated", None),
        ("mamba2_ungated", "linked"),
        ("mamba1", "linked"),
        ("mamba1", "unlinked"),
    ],
)
def test_kernel_first_run_states_and_row_ends_match_the_reference(family, row_ends):
    """The kernels' own first-run start (the SSD's: the state before chunk 0, added in the
    state passing, pallas_kernels/ssd/vjp._entry; gated, and ungated as the Mamba2 model runs
    it) against the reference's slot of its own: outputs, final states and every gradient,
    with a first run covering several chunks, one ending inside chunk 0 (its slot's final
    state is the start decayed), one ending on its edge whose id comes back later in the row.
    row_ends: each row's end state read from the passes between chunks
    (return_row_end_states: the SSD's state passing, the Mamba1 kernel's chunk-state pass;
    the row length 40 is not a multiple of its chunk of 16), with a cotangent of its own;
    "unlinked" as link_across_steps' training step runs it, "linked" with row 1 continuing
    row 0 as well."""
    seg = jnp.asarray(
        np.stack([np.zeros(40), np.repeat([0, 1], [5, 35]), np.repeat([0, 1, 0], [16, 1, 23])]),
        jnp.int32,
    )
    args, _ = family_args(family, 3, 40, seed=30)
    start = normal(40, start_shape(family, args, 3), 0.5)
    names = list(args) + ["start"]

    continues = jnp.asarray([False, True, False]) if row_ends == "linked" else None
    ends = dict(return_row_end_states=True)
    if not row_ends:
        ends = dict(return_final_states=True, num_segments=3)

    def f(impl):
        def g(*xs):
            kw = dict(zip(names, xs))
            return scan_fn(family, impl)(kw, seg, continues, first_run_states=kw["start"], **ends)

        return g

    primals = [*args.values(), start]
    shapes = jax.eval_shape(f("reference"), *primals)
    cts = tuple(normal(11 + i, o.shape).astype(o.dtype) for i, o in enumerate(shapes))
    key = (family, row_ends)
    out, grads = compiled_vjp(("first_run", *key), f("pallas_interpret"), primals, cts)
    out_ref, grads_ref = compiled_vjp(("first_run_ref", *key), f("reference"), primals, cts)
    errs = {"y": rel_err(out[0], out_ref[0]), "final": rel_err(out[1], out_ref[1])}
    errs.update({"d" + n: rel_err(g, r) for n, g, r in zip(names, grads, grads_ref)})
    print({k: f"{v:.1e}" for k, v in errs.items()})
    assert all(v < 1e-5 for v in errs.values()), errs
    assert np.abs(np.asarray(grads[-1])).max() > 0


# A float cumsum along a non-minor axis outside the kernels: XLA's GPU lowering keeps it one
# reduce-window over the whole axis, t^2 adds (it cost the SSD link 0.9 ms a layer at 8 x 2048).
SLOW_CUMSUM = "float cumsum along a non-minor axis"


def gradient_calls(f, *primals):
    """{primitive name: count} of f's gradient program, nested jaxprs included; SLOW_CUMSUM
    counts those cumsums outside the kernels."""
    counts = {}

    def walk(jaxpr, in_kernel=False):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
            if eqn.primitive.name == "cumsum" and not in_kernel:
                aval = eqn.invars[0].aval
                if jnp.issubdtype(aval.dtype, jnp.floating) and eqn.params["axis"] < aval.ndim - 1:
                    counts[SLOW_CUMSUM] = counts.get(SLOW_CUMSUM, 0) + 1
            in_kernel_below = in_kernel or eqn.primitive.name == "pallas_call"
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr, in_kernel_below)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub, in_kernel_below)

    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)  # noqa: E731
    walk(jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(len(primals)))))(*primals).jaxpr)
    return counts


@pytest.mark.parametrize("family", ["mamba1", "mamba2", "conv"])
def test_links_add_no_kernel_calls_to_the_gradient(family):
    """Linked rows (and a start state without links) run the kernels exactly as often as
    unlinked rows, gradient included: no second scan for an end state (the SSD reads it in a
    contraction, the Mamba1 kernel in its chunk-state pass, the conv kernels read the previous
    row's tail as a prefix), and no float cumsum along a non-minor axis outside them.
    Traced, not run."""
    seg, continues, _ = pack(DOCS["chain"])
    if family == "conv":
        f, (args, _) = conv_fn("pallas_interpret"), conv_args(4, ROW)
        start = dict(first_inputs=normal(50, (4, 3, 8)))
    else:
        f, (args, _) = scan_fn(family, "pallas_interpret"), family_args(family, 4, ROW)
        state = (32, 4) if family == "mamba1" else (2, 16, 16)
        start = dict(first_run_states=normal(50, (4, *state)))
    names = list(args)

    def calls(links, **extra):
        g = lambda *xs: f(dict(zip(names, xs)), seg, links, **extra)  # noqa: E731
        counts = gradient_calls(g, *args.values())
        if family != "mamba1":  # a scatter-add is atomic adds on a GPU: no bitwise isolation
            assert not [k for k in counts if k.startswith(("scatter-add", "scatter_add"))]
        assert SLOW_CUMSUM not in counts, counts
        return counts.get("pallas_call", 0)

    plain = calls(None)
    assert plain > 0
    assert calls(continues) == plain
    assert calls(None, **start) == plain
    assert calls(continues, **start) == plain
