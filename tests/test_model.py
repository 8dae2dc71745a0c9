"""MambaLM: initialisation as mamba_ssm, and packing isolation through the whole model."""

import contextlib
import dataclasses
import importlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from tests.compiled import compiled

CONFIG = jp.MambaConfig.preset("tiny", n_layer=2, d_model=32, vocab_size=61)


def params_of(model):
    return nnx.state(model, nnx.Param)


def test_config_presets_and_param_count():
    c = jp.MambaConfig.preset("130m")
    assert (c.n_layer, c.d_model, c.d_inner, c.dt_rank_resolved, c.d_state) == (
        24,
        768,
        1536,
        48,
        16,
    )
    assert c.padded_vocab_size == 50280
    assert jp.MambaConfig.preset("2.8b").dt_rank_resolved == 160
    model = jp.MambaLM(CONFIG, rngs=nnx.Rngs(0))
    assert sum(x.size for x in jax.tree.leaves(params_of(model))) == CONFIG.num_params()
    assert CONFIG.padded_vocab_size == 64
    with pytest.raises(ValueError, match="unknown preset"):
        jp.MambaConfig.preset("7b")
    with pytest.raises(ValueError, match="dtype"):
        jp.MambaConfig(dtype="int8")
    with pytest.raises(ValueError, match="d_model"):
        jp.MambaConfig(d_model=0)


def test_initialisation_follows_mamba_ssm():
    config = jp.MambaConfig.preset("tiny", d_model=64, n_layer=4)
    mixer = jp.MambaLM(config, rngs=nnx.Rngs(1)).layer(0).mixer
    n = config.d_state
    np.testing.assert_allclose(
        jnp.exp(mixer.A_log[...]),
        np.broadcast_to(np.arange(1, n + 1), (config.d_inner, n)),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(mixer.D[...], np.ones(config.d_inner))
    dt = jax.nn.softplus(mixer.dt_proj.bias[...])
    assert dt.min() >= config.dt_min * 0.999 and dt.max() <= config.dt_max * 1.001
    assert abs(mixer.dt_proj.kernel[...]).max() <= config.dt_rank_resolved**-0.5
    bound = 1 / np.sqrt(config.d_inner) / np.sqrt(config.n_layer)
    assert abs(mixer.out_proj.kernel[...]).max() <= bound


def test_compute_dtype_bfloat16_keeps_params_float32():
    config = jp.MambaConfig.preset("tiny", dtype="bfloat16")
    model = jp.MambaLM(config, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_of(model)))
    logits = model(jnp.zeros((1, 5), jnp.int32))
    assert logits.dtype == jnp.bfloat16 and logits.shape == (1, 5, config.padded_vocab_size)


LENGTHS = [1, 9, 70, 1, 9]  # total 90; the 70 spans a scan-chunk edge; 3 alone lengths to compile


def packed_row(rng):
    seqs = [rng.integers(0, CONFIG.vocab_size, n) for n in LENGTHS]
    ids = np.concatenate(seqs)[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(LENGTHS)])[None]
    return seqs, jnp.asarray(ids, jnp.int32), jnp.asarray(seg, jnp.int32)


def logits_and_grads(model, ids, seg, cotangent):
    """(logits, parameter gradients under cotangent), one compile per input shape."""
    graphdef, params = nnx.split(model)

    def run(params, ids, seg, cotangent):
        logits, vjp = jax.vjp(lambda p: nnx.merge(graphdef, p)(ids, seg), params)
        return logits, vjp(cotangent)[0]

    args = (params, ids, seg, cotangent)
    logits, grads = compiled(("lm_vjp", CONFIG, seg is None), run, *args)(*args)
    return logits, grads


def test_packed_batch_gives_each_sequence_its_alone_logits_and_grads():
    model = jp.MambaLM(CONFIG, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(0)
    seqs, ids, seg = packed_row(rng)
    cot = jax.random.normal(jax.random.key(3), (1, ids.shape[1], CONFIG.padded_vocab_size))
    logits, packed_grads = logits_and_grads(model, ids, seg, cot)
    # Each sequence's logits are its alone logits, and the sum of per-sequence parameter
    # gradients is the packed gradient.
    summed, start = None, 0
    for seq in seqs:
        n = len(seq)
        alone, g = logits_and_grads(
            model, jnp.asarray(seq[None], jnp.int32), None, cot[:, start : start + n]
        )
        np.testing.assert_allclose(logits[:, start : start + n], alone, rtol=1e-5, atol=1e-5)
        summed = g if summed is None else jax.tree.map(jnp.add, summed, g)
        start += n
    for (path, a), b in zip(jax.tree.leaves_with_path(packed_grads), jax.tree.leaves(summed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_perturbing_one_sequence_leaves_others_bit_identical():
    model = jp.MambaLM(CONFIG, rngs=nnx.Rngs(4))
    seqs, ids, seg = packed_row(np.random.default_rng(1))
    victim = slice(sum(LENGTHS[:2]), sum(LENGTHS[:3]))
    cot = jax.random.normal(jax.random.key(5), (1, ids.shape[1], CONFIG.padded_vocab_size))
    cot = cot.at[:, victim].set(0.0)  # parameter gradients then come from the other sequences only
    noisy_ids = ids.at[:, victim].set((ids[:, victim] + 7) % CONFIG.vocab_size)
    logits0, grads0 = logits_and_grads(model, ids, seg, cot)
    logits1, grads1 = logits_and_grads(model, noisy_ids, seg, cot)
    assert not np.array_equal(logits0[:, victim], logits1[:, victim])
    keep = np.ones(ids.shape[1], bool)
    keep[victim] = False
    np.testing.assert_array_equal(logits0[:, keep], logits1[:, keep])
    for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1)):
        np.testing.assert_array_equal(a, b)


def test_bad_model_input():
    model = jp.MambaLM(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids must have the shape"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 5), jnp.int32))


def test_training_step_compile_time_does_not_grow_with_depth():
    """With scan_layers the layers run under one scan: the compiled training step (value_and_grad
    of the loss, each layer rematerialised) holds one block whatever the depth, so its compile
    time does not grow with it (with the unrolled layer loop it grew about linearly: 5.1 s at 6
    layers, 16.8 s at 24). Measured as the compiled program's size, which the compile time
    follows and which, unlike a timing, the shared cores leave alone: unrolled, it is 3.6x at 8
    layers what it is at 2. Mamba2 for the cheaper compile (the LM is the same for both)."""

    def compiled_lines(n_layer):
        config = jp.Mamba2Config.preset(
            "tiny",
            n_layer=n_layer,
            d_model=16,
            d_state=4,
            headdim=8,
            chunk_size=8,
            vocab_size=16,
            remat="full",
            scan_layers=True,
        )
        graphdef, params = nnx.split(jp.Mamba2LM(config, rngs=nnx.Rngs(0)))
        ids = jnp.zeros((1, 8), jnp.int32)

        def loss(params):
            logits = nnx.merge(graphdef, params)(ids, ids)
            return jp.masked_cross_entropy(logits, ids, ids > 0)[0]

        step = compiled(("depth_step", n_layer), jax.value_and_grad(loss), params)
        return len(step.as_text().splitlines())

    shallow, deep = compiled_lines(2), compiled_lines(8)
    print(f"compiled program: 2 layers {shallow} lines, 8 layers {deep} lines")
    assert deep < 1.2 * shallow, (shallow, deep)


def test_scanned_and_unrolled_layers_compute_the_same():
    """scan_layers only changes how the stacked layers run: the same logits, gradients, prefill
    cache and decode step either way; unrolled, the backward gathers the parameters' gradients
    with one concatenate each, not a full-size pad per layer (x[i]'s transpose)."""
    with pytest.raises(ValueError, match="scan_layers must be a bool"):
        jp.MambaConfig(scan_layers="yes")
    config = jp.MambaConfig.preset("tiny", n_layer=2, d_model=16, d_state=4, vocab_size=16)
    model = jp.MambaLM(config, rngs=nnx.Rngs(0))
    graphs = {}
    for scan in (False, True):
        model.config = dataclasses.replace(config, scan_layers=scan)
        graphs[scan], params = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 16, (3, 8)), jnp.int32)
    seg = jnp.asarray([[0] * 3 + [1] * 5, [0] * 8, [0] * 6 + [1] * 2], jnp.int32)
    out = {}
    for scan in (False, True):
        graph = graphs[scan]

        def loss(p, graph=graph):
            return jp.masked_cross_entropy(nnx.merge(graph, p)(ids, seg), ids, seg >= 0)[0]

        def outputs(p, graph=graph):
            model = nnx.merge(graph, p)
            logits, cache = model(ids, seg, num_segments=2)
            step = model(ids[:, -1], cache=jax.tree.map(lambda x: x[:, :, 0], cache))
            return dict(
                logits=model(ids, seg), grads=jax.grad(loss)(p), prefill=(logits, cache), step=step
            )

        out[scan] = compiled(("scanned_or_unrolled", scan), outputs, params)(params)
        if not scan:
            jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    for (path, a), b in zip(jax.tree.leaves_with_path(out[False]), jax.tree.leaves(out[True])):
        assert a.shape == b.shape, jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert out[False]["prefill"][1].ssm.shape[:3] == (2, 3, 2)  # (l, b, S, ...) either way
    # The stacked parameters are the only (2, ...) float arrays (batch 3, length 8, widths >= 4).
    n_stacked = sum(x.shape[0] == 2 for x in jax.tree.leaves(params))
    lines = jaxpr.splitlines()
    assert not [line for line in lines if "f32[2," in line and " = pad[" in line]
    assert (
        sum("f32[2," in line and "concatenate[dimension=0]" in line for line in lines) >= n_stacked
    )


def test_remat_policies_give_the_gradients_of_no_remat():
    """Each named policy recomputes per layer what it does not save; the old remat flag's
    values name the policies. (Unrolled, XLA fuses each variant's program differently: a few
    embedding gradients differ by float32 rounding, 9e-6 at most.)"""
    assert (
        jp.MambaConfig(remat=True).remat == "full" and jp.MambaConfig(remat=False).remat == "none"
    )
    with pytest.raises(ValueError, match="remat must be one of"):
        jp.Mamba2Config(remat="some")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 16, (1, 12)), jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    grads = {}
    for policy in jp.config.REMAT:
        config = jp.Mamba2Config.preset(
            "tiny",
            n_layer=2,
            d_model=16,
            d_state=4,
            headdim=8,
            chunk_size=8,
            vocab_size=16,
            remat=policy,
        )
        graphdef, params = nnx.split(jp.Mamba2LM(config, rngs=nnx.Rngs(0)))
        grads[policy] = compiled(
            ("remat_grad", policy),
            jax.grad(
                lambda p: jp.masked_cross_entropy(nnx.merge(graphdef, p)(ids, seg), ids, seg > 0)[0]
            ),
            params,
        )(params)
    for policy in jp.config.REMAT[1:]:
        for (path, a), b in zip(
            jax.tree.leaves_with_path(grads["none"]), jax.tree.leaves(grads[policy])
        ):
            np.testing.assert_allclose(
                b, a, rtol=1e-5, atol=2e-5, err_msg=f"{policy} {jax.tree_util.keystr(path)}"
            )


# Both families at 3 layers (so the layer axis differs from the batch of 2); Mamba2's widths are
# the smallest its Pallas kernels take (headdim and d_state >= 16).
SAVE_KERNEL_CONFIGS = {
    "mamba": jp.MambaConfig.preset("tiny", n_layer=3, d_model=16, d_state=4, vocab_size=16),
    "mamba2": jp.Mamba2Config.preset(
        "tiny", n_layer=3, d_model=16, d_state=16, headdim=16, chunk_size=16, vocab_size=16
    ),
}


def _lm_loss(config, ids, seg):
    graphdef, params = nnx.split(jp.LM(config, rngs=nnx.Rngs(0)))

    def loss(p):
        return jp.masked_cross_entropy(nnx.merge(graphdef, p)(ids, seg), ids, seg > 0)[0]

    return loss, params


def _primitive_counts(jaxpr, names, counts=None) -> dict:
    """How often each primitive in `names` occurs in jaxpr, sub-jaxprs (scan bodies, remat,
    custom_vjp) included."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _primitive_counts(sub.jaxpr, names, counts)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _primitive_counts(sub, names, counts)
    return counts


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_save_kernel_outputs_keeps_what_a_gemm_or_kernel_makes(family):
    """remat "save_kernel_outputs" gives the loss and gradients of no remat, scanned and
    unrolled (against unrolled without remat: scanned and unrolled alike are tested above).
    Traced with the Pallas kernels (interpreter) and scanned layers, the gradient's program
    holds as many matmuls and kernel calls as without remat (none is recomputed), and each layer
    saves, stacked, only its input (the residual stream, float32), the kernels' chunk states,
    and the projections', conv's, scan's and norms' bf16 outputs: no float32 copy, no weight
    cast."""
    base = SAVE_KERNEL_CONFIGS[family]
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 16, (2, 24)), jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 19, [1] * 24], jnp.int32)
    out = {}
    # Mamba2 unrolled under save_kernel_outputs: test_remat_policies_give_the_gradients_of_no_remat.
    scans = (False, True) if family == "mamba" else (True,)
    for scan, remat in [(False, "none")] + [(scan, "save_kernel_outputs") for scan in scans]:
        loss, params = _lm_loss(dataclasses.replace(base, scan_layers=scan, remat=remat), ids, seg)
        key = ("save_kernel_outputs_step", family, scan, remat)
        out[scan, remat] = compiled(key, jax.value_and_grad(loss), params)(params)
    for scan in scans:
        for (path, a), b in zip(
            jax.tree.leaves_with_path(out[False, "none"]),
            jax.tree.leaves(out[scan, "save_kernel_outputs"]),
        ):
            # XLA fuses the two programs differently: float32 rounding of the largest entries.
            np.testing.assert_allclose(
                b,
                a,
                rtol=1e-5,
                atol=1e-6 * float(np.abs(a).max()),
                err_msg=f"scan={scan} {jax.tree_util.keystr(path)}",
            )

    kernels = dict(scan_impl="pallas_interpret", conv_impl="pallas_interpret", dtype="bfloat16")
    counts, stacked = {}, {}
    for remat in ("none", "save_kernel_outputs"):
        config = dataclasses.replace(base, scan_layers=True, remat=remat, **kernels)
        loss, params = _lm_loss(config, ids, seg)
        jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
        counts[remat] = _primitive_counts(jaxpr, ("dot_general", "pallas_call"))
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            jax.ad_checkpoint.print_saved_residuals(loss, params)
        stacked[remat] = [
            line.split()[0]
            for line in text.getvalue().splitlines()
            if "output of scan" in line and line.split("[")[1].startswith("3,")
        ]
    assert counts["save_kernel_outputs"] == counts["none"] and counts["none"]["pallas_call"]
    n, b, t, d = 3, 2, 24, base.d_model
    saved = stacked["save_kernel_outputs"]
    assert all(s.split("[")[1].startswith(f"{n},{b},") for s in saved), saved
    wide = [s for s in saved if s.startswith("f32") and s.count(",") >= 4]  # chunk states
    f32_tokens = [s for s in saved if s.startswith("f32") and s not in wide]
    assert f32_tokens == [f"f32[{n},{b},{t},{d}]"], saved
    per_token = [s for s in saved if s.startswith(f"bf16[{n},{b},{t},")]
    # mixer input, then Mamba1: x, z, conv, x_proj, dt, scan output; Mamba2: z, xBC, dt,
    # conv (as its x, B and C), SSD output, gated norm output.
    tensors = {"mamba": 7, "mamba2": 9}[family]
    assert len(per_token) == tensors and len(saved) == tensors + 1 + len(wide), saved
    assert wide and len(stacked["none"]) > len(saved), stacked


LEAN = "save_projections_and_scan"
STATES = "save_projections_scan_and_states"


@pytest.fixture
def pallas_norms(monkeypatch):
    """The norms on their Pallas kernels (interpreter) too, as on a GPU: the lean policy tells
    the gated norm's kernel apart from the block norm's."""
    rms_norm = importlib.import_module("jax_packmamba.ops.rms_norm")
    resolve = rms_norm._resolve
    monkeypatch.setattr(
        rms_norm,
        "_resolve",
        lambda impl, x: resolve("pallas_interpret" if impl == "auto" else impl, x),
    )


def _interpreted(family, remat, dtype, **overrides):
    kernels = dict(scan_impl="pallas_interpret", conv_impl="pallas_interpret")
    return dataclasses.replace(
        SAVE_KERNEL_CONFIGS[family], remat=remat, dtype=dtype, **kernels, **overrides
    )


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_save_projections_and_scan_gives_the_gradients_of_no_remat(family, pallas_norms):
    """Every op on its Pallas kernel (interpreter), float32: the lean policy (the conv, the
    gated norm and out_proj's input recomputed per layer; Mamba2's SSD recomputing its chunk
    states in its backward) gives the loss and gradients of no remat, to float32 rounding."""
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, 16, (2, 24)), jnp.int32)
    seg = jnp.asarray([[1] * 7 + [2] * 17, [1] * 24], jnp.int32)
    out = {}
    for remat in ("none", LEAN):
        loss, params = _lm_loss(_interpreted(family, remat, "float32", n_layer=1), ids, seg)
        step = jax.jit(jax.value_and_grad(loss)).lower(params)
        out[remat] = step.compile(compiler_options=dict(xla_backend_optimization_level=0))(params)
    for (path, a), b in zip(
        jax.tree.leaves_with_path(out["none"]), jax.tree.leaves(out[LEAN]), strict=True
    ):
        np.testing.assert_allclose(
            b, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()), err_msg=jax.tree_util.keystr(path)
        )


def _saved_activations(loss, params, batch, length) -> list[tuple[str, int]]:
    """(line, bytes) of each value print_saved_residuals lists whose leading axis is the batch
    (rank >= 2) or its tokens: the activations, not the (at these widths comparable) weights."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        jax.ad_checkpoint.print_saved_residuals(loss, params)
    rows = []
    for line in text.getvalue().splitlines():
        dtype, dims = line.split("]")[0].split("[")
        shape = [int(d) for d in dims.split(",") if d]
        if not (shape and (shape[0] == batch * length or shape[0] == batch and len(shape) > 1)):
            continue
        size = int(np.prod(shape))
        bits = 8 if dtype == "bool" else int(re.sub(r"\D", "", dtype))  # f32, bf16, i32, ...
        rows.append((line, size * bits // 8))
    return rows


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_save_projections_and_scan_keeps_neither_conv_outputs_nor_chunk_states(
    family, pallas_norms
):
    """Traced (bf16, kernels through the interpreter, one layer): the lean policy saves no conv
    output, no gated-norm output or statistic, no out_proj input, and for Mamba2 no SSD chunk
    state (float32, rank >= 4: save_kernel_outputs keeps h_in); Mamba1 keeps its scan's chunk
    states (kernel outputs its backward reads). Fewer bytes than none and save_kernel_outputs;
    the price: the gradient's program runs the conv's forward kernel once more and, for Mamba2,
    the gated norm's, the SSD's chunk-state and state-passing kernels. "STATES"
    (save_projections_scan_and_states) is the lean policy with the SSD's chunk states saved as
    save_kernel_outputs saves them: its gradient reruns only the conv's and the gated norm's
    forward kernels (for Mamba1 it is the lean policy)."""
    ids = jnp.zeros((2, 24), jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 19, [1] * 24], jnp.int32)
    saved, total = {}, {}
    for remat in ("none", "save_kernel_outputs", LEAN, STATES):
        config = _interpreted(family, remat, "bfloat16", n_layer=1)
        saved[remat] = _saved_activations(*_lm_loss(config, ids, seg), *ids.shape)
        total[remat] = sum(size for _, size in saved[remat])
    lines = [line for line, _ in saved[LEAN]]
    for absent in ("named 'conv'", "causal_conv1d", "gated_rms_norm", "named 'out_proj_input'"):
        assert not [line for line in lines if absent in line], absent
    assert [line for line, _ in saved["save_kernel_outputs"] if "named 'conv'" in line]

    def chunk_states(remat):
        return [line for line, _ in saved[remat] if re.match(r"f32\[\d+(,\d+){3,}\]", line)]

    assert chunk_states("save_kernel_outputs")
    expected = {"mamba": chunk_states("save_kernel_outputs"), "mamba2": []}[family]
    assert chunk_states(LEAN) == expected, lines
    assert chunk_states(STATES) == chunk_states("save_kernel_outputs")
    assert total[LEAN] < min(total["save_kernel_outputs"], total["none"]), total

    # What it costs: each recomputed kernel's forward runs once more, nothing else does.
    kernels = {}
    for remat in ("none", LEAN, STATES):
        loss, params = _lm_loss(_interpreted(family, remat, "bfloat16", n_layer=1), ids, seg)
        kernels[remat] = _kernel_counts(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    again = {
        LEAN: {
            "mamba": [],
            "mamba2": ["gated_rms_norm_fwd", "ssd_chunk_states", "ssd_state_passing"],
        },
        STATES: {"mamba": [], "mamba2": ["gated_rms_norm_fwd"]},
    }
    for remat in (LEAN, STATES):
        extra = {k: kernels[remat][k] - kernels["none"].get(k, 0) for k in kernels[remat]}
        conv = [k for k in extra if k.startswith("causal_conv1d") and k.endswith("_fwd")]
        assert len(conv) == 1, extra
        expected = dict.fromkeys(again[remat][family] + conv, 1)
        assert {k: n for k, n in extra.items() if n} == expected, (remat, extra)


def _kernel_counts(jaxpr, counts=None) -> dict:
    """How often each Pallas kernel (pallas_call's name) occurs in jaxpr and its sub-jaxprs."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            counts[eqn.params["name"]] = counts.get(eqn.params["name"], 0) + 1
            continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _kernel_counts(sub, counts)
    return counts
