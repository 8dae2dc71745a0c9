"""What the benchmarks run on: token workloads, batches, the model and train step, scan inputs
and the scan-config arguments of the scripts that take them.

Public and shared: bench_train.py, breakdown.py and the probes build their model, optimizer and
batches here, so they measure the same thing.

Workloads (host only, deterministic from the seed; `make_workload`):
  corpus    the training program's default corpus (train.data.load_corpus, source "stdlib": the
            Python standard library's .py files, byte tokens, each document ends with EOD 256);
            whole documents in a seeded random order until `tokens` are reached.
  instruct  a long-tailed mix typical of instruction data: document lengths (EOD included) drawn
            from a lognormal with median 300 tokens and sigma 1.0 (p90 ~1,080, p99 ~3,070),
            rounded and clipped to [16, 8192], until `tokens` are reached; the content is
            consecutive cuts of the stdlib byte stream (each cut ends with EOD 256).
Batching modes (`batches_for`, the trainer's own train.data.Batcher): packed, padded, single,
link and link_across_steps (--data.long_docs's: whole documents).

The model (`model_config`): a train.config preset with the released vocabulary (50277, so the
FLOPs match mamba_ssm's; byte ids use the first 257) except for "tiny" and "mamba2-tiny"; the
step (`train_setup`): train/step.py's build on one device, AdamW at OPTIM over SCHEDULE_STEPS
(`mesh_train_setup`: the same on a mesh of several).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

MODES = ("packed", "padded", "single", "link", "link_across_steps")
DISTS = ("corpus", "instruct")
RELEASED_VOCAB = 50277
BYTE_VOCAB = 257
# The long-tailed "instruct" mix: lognormal document lengths (tokens, EOD included).
INSTRUCT = dict(median=300, sigma=1.0, min_len=16, max_len=8192)
HIST_EDGES = [2**k for k in range(3, 21)]  # 8 .. 1M tokens, log2 bins
SCHEDULE_STEPS = 1000


# ------------------------------------------------------------------------------------------------
# Token workloads.


def stdlib_corpus():
    """The trainer's default corpus (train.data.load_corpus with source "stdlib")."""
    from train.config import DataConfig
    from train.data import load_corpus

    return load_corpus(DataConfig(source="stdlib"))


def make_workload(dist: str, *, tokens: int, seed: int, corpus=None) -> dict:
    """{"docs": [int32 arrays, each ending with EOD 256], "info": JSON-able description}."""
    corpus = corpus if corpus is not None else stdlib_corpus()
    if dist == "corpus":
        order = np.random.default_rng([seed, 0xC0]).permutation(len(corpus.documents))
        picked, total = [], 0
        for i in order:
            if total >= tokens:
                break
            picked.append(int(i))
            total += len(corpus.documents[i])
        docs = [corpus.documents[i] for i in picked]
        every = np.array([len(d) for d in corpus.documents], np.int64)
        info = dict(
            description=f"{corpus.description}: whole documents (EOD appended) in a seeded "
            f"random order until {tokens} tokens",
            source="stdlib",
            doc_indices=picked,
            population=dict(
                num_documents=len(every),
                num_tokens=int(every.sum()),
                stats=length_stats(every),
                histogram=histogram(every),
            ),
        )
    elif dist == "instruct":
        p = INSTRUCT
        rng = np.random.default_rng([seed, 0x1A57])
        lengths, total = [], 0
        while total < tokens:
            n = int(
                np.clip(
                    np.rint(rng.lognormal(math.log(p["median"]), p["sigma"])),
                    p["min_len"],
                    p["max_len"],
                )
            )
            lengths.append(n)
            total += n
        stream = np.concatenate([d[:-1] for d in corpus.documents])  # stdlib bytes, no EOD
        pos = int(rng.integers(0, len(stream)))
        docs = []
        for n in lengths:
            if pos + n - 1 > len(stream):
                pos = 0
            docs.append(
                np.concatenate(
                    [stream[pos : pos + n - 1], np.array([corpus.eod_id], np.int32)]
                ).astype(np.int32)
            )
            pos += n - 1
        info = dict(
            description=f"long-tailed instruction-like mix: lognormal lengths median "
            f"{p['median']} sigma {p['sigma']} clipped to [{p['min_len']}, "
            f"{p['max_len']}] tokens, content cut from the stdlib byte stream",
            source="synthetic",
            params=dict(p),
        )
    else:
        raise ValueError(f"unknown distribution {dist!r}; choose from {DISTS}")
    lengths = np.array([len(d) for d in docs], np.int64)
    info.update(
        dist=dist,
        seed=seed,
        workload_tokens=tokens,
        num_documents=len(docs),
        num_tokens=int(lengths.sum()),
        doc_lengths=lengths.tolist(),
        stats=length_stats(lengths),
        histogram=histogram(lengths),
    )
    return dict(docs=docs, info=info)


def length_stats(lengths: np.ndarray) -> dict:
    q = np.percentile(lengths, [10, 50, 90, 99])
    return dict(
        min=int(lengths.min()),
        p10=float(q[0]),
        median=float(q[1]),
        mean=float(lengths.mean()),
        p90=float(q[2]),
        p99=float(q[3]),
        max=int(lengths.max()),
    )


def histogram(lengths: np.ndarray) -> dict:
    """Documents and tokens per log2 bin of length (plot_train.py draws them)."""
    edges = list(HIST_EDGES)
    top = int(lengths.max()) + 1
    if top > edges[-1]:
        edges.append(1 << (top - 1).bit_length())
    idx = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    toks = np.bincount(idx, weights=lengths, minlength=len(edges) - 1)
    below = int((lengths < edges[0]).sum())
    return dict(
        edges=edges,
        counts=counts.tolist(),
        tokens=[int(t) for t in toks],
        note=f"bin i holds lengths in [edges[i], edges[i+1]); {below} below edges[0] "
        f"are counted in bin 0",
    )


def batches_for(
    mode: str,
    pieces: list,
    *,
    seq_len: int,
    rows: int,
    single_bucket: int,
    seed: int,
    stream_groups: int = 1,
) -> list[dict]:
    """The whole workload as the trainer's Batcher makes it: [{"arrays", "real", "slots",
    "sequences"}] (padded batches also give "longest", the longest piece's length; link and
    link_across_steps take whole documents as `pieces`: see carried_batches for the latter)."""
    from train.data import Batcher

    n = len(pieces)
    if mode == "link_across_steps":
        return carried_batches(pieces, seq_len=seq_len, rows=rows, seed=seed, groups=stream_groups)
    if mode == "link":  # pieces are whole documents: streamed end to end, rows linked
        b = Batcher(
            pieces,
            mode="packed",
            seq_len=seq_len,
            batch_size=rows,
            seed=seed,
            wrap=False,
            long_docs="link",
        )
        out = []
        while b.consumed < n:
            out.append(_record(next(b), linked="linked_documents", longest_chain="longest_chain"))
        return out
    if mode == "packed":
        b = Batcher(pieces, mode="packed", seq_len=seq_len, batch_size=rows, seed=seed, wrap=False)
        out = []
        while b.consumed < n or b.carry:
            out.append(_record(next(b)))
        return out
    if mode == "padded":
        b = Batcher(pieces, mode="padded", seq_len=seq_len, batch_size=rows, seed=seed)
        out = []
        for s in range(-(-n // rows)):
            x = next(b)
            fresh = min(rows, n - s * rows)  # the last batch wraps round: count new pieces only
            seg = x["arrays"]["segment_ids"][0, :fresh]
            longest = int((seg > 0).sum(axis=1).max())
            out.append(
                dict(
                    arrays=x["arrays"],
                    real=int((seg > 0).sum()),
                    slots=x["stats"]["slots"],
                    sequences=fresh,
                    longest=longest,
                )
            )
        return out
    if mode == "single":
        b = Batcher(
            pieces,
            mode="single",
            seq_len=seq_len,
            batch_size=1,
            seed=seed,
            single_bucket=single_bucket,
        )
        out = []
        for _ in range(n):
            x = next(b)
            out.append(
                dict(
                    arrays=x["arrays"],
                    real=x["stats"]["real_tokens"],
                    slots=x["stats"]["slots"],
                    sequences=1,
                )
            )
        return out
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def carried_batches(
    docs: list, *, seq_len: int, rows: int, seed: int, groups: int = 1, steps: int | None = None
) -> list[dict]:
    """--data.long_docs=link_across_steps' batches of whole documents `docs`, as the trainer's
    Batcher makes them (stream_groups=groups; wrapping round, as in training: one stream per row,
    a row's last document going on in the same row of its group's next micro-batch, "continues"
    saying so; no padding ever). `steps` batches (default: as many as the documents' tokens
    fill; a finite stream's tail, rows emptying one by one as their last documents end, is
    no training stream's), each {"arrays", "real", "slots", "sequences" (documents begun),
    "continuing" (rows whose state comes from the previous micro-batch),
    "longest_document_rows"}."""
    from train.data import Batcher

    if steps is None:
        steps = -(-sum(len(d) for d in docs) // (rows * seq_len))
    b = Batcher(
        docs,
        mode="packed",
        seq_len=seq_len,
        batch_size=rows,
        seed=seed,
        long_docs="link_across_steps",
        stream_groups=groups,
    )
    return [
        _record(
            next(b), continuing="continuing_rows", longest_document_rows="longest_document_rows"
        )
        for _ in range(steps)
    ]


def _record(batch: dict, **stats) -> dict:
    """A Batcher batch as the benchmarks keep it: {"arrays", "real", "slots", "sequences"} plus,
    for each keyword, that name holding the batch's stats entry it names."""
    s = batch["stats"]
    return dict(
        arrays=batch["arrays"],
        real=s["real_tokens"],
        slots=s["slots"],
        sequences=s["sequences"],
        **{name: s[key] for name, key in stats.items()},
    )


def packed_batch(*, rows: int, seq_len: int, seed: int = 0) -> dict:
    """One packed batch of the "instruct" workload ({"arrays", "real", ...} as batches_for)."""
    from train.data import cut_pieces

    w = make_workload("instruct", tokens=2 * rows * seq_len, seed=seed)
    return batches_for(
        "packed",
        cut_pieces(w["docs"], seq_len),
        seq_len=seq_len,
        rows=rows,
        single_bucket=64,
        seed=seed,
    )[0]


# ------------------------------------------------------------------------------------------------
# Model and step.


def parse_overrides(text: str) -> dict:
    """ "n_layer=1,d_model=32,remat=true" -> {"n_layer": 1, "d_model": 32, "remat": True}: ints,
    then floats, then true/false, else the text."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, _, v = item.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def model_config(
    preset: str,
    *,
    backend: str,
    dtype: str = "auto",
    scan_impl: str = "auto",
    conv_impl: str = "auto",
    remat: str | bool = "none",
    scan_layers: bool = False,
    overrides: dict | None = None,
):
    """The benchmarks' MambaConfig (Mamba2Config for a "mamba2-" preset): the preset with the
    released vocabulary (but "tiny" and "mamba2-tiny"), then `overrides` (its fields)."""
    from train.config import ModelConfig

    fields = (
        {}
        if preset in ("tiny", "mamba2-tiny", "mamba3-tiny", "hybrid-tiny")
        else {"vocab_size": RELEASED_VOCAB}
    )
    fields.update(overrides or {})
    return ModelConfig(
        preset=preset,
        dtype=dtype,
        scan_impl=scan_impl,
        conv_impl=conv_impl,
        remat=str(remat).lower(),
        scan_layers=scan_layers,
        overrides=fields,
    ).mamba_config(vocab_size=BYTE_VOCAB, backend=backend)


def optim_config():
    """AdamW as the benchmarks train (train.config.OptimConfig)."""
    from train.config import OptimConfig

    return OptimConfig(lr=1e-4, warmup_steps=10)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """train/step.py's compiled step on a one-device mesh (compiled: train.step.Compiled)."""

    mesh: object
    compiled: object
    optim: object
    schedule_steps: int

    def put_batch(self, arrays: dict) -> dict:
        """Host batch arrays (Batcher's) onto the mesh."""
        from train import sharding

        return sharding.put_batch(arrays, sharding.batch_sharding(self.mesh))


def train_setup(
    config, device, *, carry_rows: int | None = None, stream_groups: int = 1
) -> TrainSetup:
    """The train step for MambaConfig `config` on `device` alone (carry_rows, stream_groups:
    the carried step of --data.long_docs=link_across_steps, as mesh_train_setup)."""
    from train import sharding
    from train.config import MeshConfig

    return mesh_train_setup(
        config,
        sharding.make_mesh(MeshConfig(data=1, fsdp=1), devices=[device]),
        carry_rows=carry_rows,
        stream_groups=stream_groups,
    )


def mesh_train_setup(
    config,
    mesh,
    *,
    grad_reduce: str = "auto",
    carry_rows: int | None = None,
    stream_groups: int = 1,
) -> TrainSetup:
    """The train step for MambaConfig `config` on a train.sharding mesh (batch rows over data x
    fsdp, parameters and optimizer state on fsdp); grad_reduce as train.step.build takes it;
    carry_rows (rows a step) and stream_groups: the state carries every row stream's end state
    from step to step, as the trainer builds it for --data.long_docs=link_across_steps
    (train.trainer.build_step)."""
    from train import step as step_lib

    optim = optim_config()
    return TrainSetup(
        mesh=mesh,
        compiled=step_lib.build(
            config,
            optim,
            SCHEDULE_STEPS,
            mesh,
            grad_reduce=grad_reduce,
            carry_rows=carry_rows,
            stream_groups=stream_groups,
        ),
        optim=optim,
        schedule_steps=SCHEDULE_STEPS,
    )


# ------------------------------------------------------------------------------------------------
# Selective-scan inputs and kernel configs.


def scan_inputs(key, batch, length, d_inner, d_state, dtype, num_segments=None):
    """(dict u, delta, A, B, C, D, z, delta_bias; segment_ids or None) as a Mamba layer feeds
    the scan: u/delta/B/C/z in `dtype`, A/D/delta_bias float32; with num_segments, that many
    runs of random lengths (at least 1) a row, ids 0..num_segments-1."""
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(key, 9)
    f32 = jnp.float32
    args = dict(
        u=jax.random.normal(ks[0], (batch, length, d_inner), f32).astype(dtype),
        delta=(0.5 * jax.random.normal(ks[1], (batch, length, d_inner), f32) - 2.0).astype(dtype),
        A=-jnp.exp(0.5 * jax.random.normal(ks[2], (d_inner, d_state), f32)),
        B=jax.random.normal(ks[3], (batch, length, d_state), f32).astype(dtype),
        C=jax.random.normal(ks[4], (batch, length, d_state), f32).astype(dtype),
        D=jax.random.normal(ks[5], (d_inner,), f32),
        z=jax.random.normal(ks[6], (batch, length, d_inner), f32).astype(dtype),
        delta_bias=0.3 * jax.random.normal(ks[7], (d_inner,), f32),
    )
    seg = None
    if num_segments:
        rng = np.random.default_rng(int(jax.random.randint(ks[8], (), 0, 2**30)))
        seg = np.zeros((batch, length), np.int32)
        for b in range(batch):
            cuts = np.sort(rng.choice(np.arange(1, length), num_segments - 1, replace=False))
            seg[b] = np.searchsorted(cuts, np.arange(length), side="right")
        seg = jnp.asarray(seg)
    return args, seg


# A smoke run's kernel config (on top of the heuristic's): nothing unrolled, no windows or
# prefetch, so the Pallas interpreter's programs compile in seconds on CPU.
SMOKE_SCAN_OVERRIDES = dict(unroll=1, window=1, ckpt=4, prefetch=False, reduce="tree")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """ "8:2048:4096:16" -> (batch, length, d_inner, d_state)."""
    try:
        shape = tuple(int(x) for x in text.split(":"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"expected b:l:d:n (four positive ints), got {text!r}")
    return shape


def add_scan_arguments(parser, *, full_shape=None, smoke_shape=None) -> None:
    """ScanConfig overrides as field=value arguments, and --shape b:l:d:n if shapes are given
    (resolve them with scan_arguments)."""
    parser.add_argument("overrides", nargs="*", metavar="field=value", help="ScanConfig overrides")
    if full_shape is not None:
        text = ":".join(map(str, full_shape)), ":".join(map(str, smoke_shape))
        parser.add_argument(
            "--shape", default=None, help=f"b:l:d:n (default {text[0]}; smoke {text[1]})"
        )
        parser.set_defaults(scan_shapes=(full_shape, smoke_shape))


def scan_arguments(parser, args) -> tuple[tuple | None, dict]:
    """(shape, overrides) from add_scan_arguments' arguments; bad ones end in parser.error."""
    try:
        overrides = scan_config_overrides(args.overrides)
    except ValueError as e:
        parser.error(str(e))
    shapes = getattr(args, "scan_shapes", None)
    if shapes is None:
        return None, overrides
    try:
        shape = parse_shape(args.shape) if args.shape else shapes[1 if args.smoke else 0]
    except ValueError as e:
        parser.error(f"--shape: {e}")
    return shape, overrides


def scan_config_field(name: str, text: str, cls=None):
    """A field's value of a kernel config (`cls`, default ScanConfig) from text, typed by the
    field's default: ints, bools as 0/1/true/false, optional ints (grads_maxnreg) also "none",
    strings as they are."""
    if cls is None:
        from pallas_kernels.selective_scan.config import ScanConfig as cls
    if name not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(f"{cls.__name__} has no field {name!r}")
    default = getattr(cls(), name)
    if default is None:
        return None if text.lower() == "none" else int(text)
    if isinstance(default, bool):
        if text.lower() not in ("0", "1", "true", "false"):
            raise ValueError(f"{name} takes 0/1/true/false, got {text!r}")
        return text.lower() in ("1", "true")
    return type(default)(text)


def scan_config_overrides(items: Iterable[str], cls=None) -> dict:
    """["window=2", "unroll=2"] -> {"window": 2, "unroll": 2} (see scan_config_field)."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"expected field=value, got {item!r}")
        out[name] = scan_config_field(name, text, cls)
    return out
