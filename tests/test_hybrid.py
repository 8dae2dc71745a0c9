"""The hybrid LM (Mamba2 + attention + MLP): packing isolation through the whole model, the
packed prefill and decode with KV caches, Bamba and Nemotron-H checkpoints (parity with
transformers, alone and packed; save and reload), bad configs."""

import dataclasses
import functools
import importlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from jax_packmamba.config import HybridConfig
from jax_packmamba.hybrid import KVCache, pad_kv_cache
from jax_packmamba.model import LM
from jax_packmamba.pretrained import pair_layers
from tests import hf_hybrid_loop
from tests.compiled import compiled

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
HYBRID_FIXTURES = ["bamba", "bamba_tied", "nemotron_h", "nemotron_h_small"]
# Parity is float32 rounding, nothing else. tests/hf_hybrid_loop.py computes each fixture's
# exact logits in float64 (SSM step by step); our model run in float64 matches it to 5e-14
# (test_float64_model_is_the_exact_forward), so the two formulations are the same. In float32,
# transformers' logits (the fixtures) land up to 4.2e-6 * max|logits| from it and ours up to
# 4.6e-6 * max|logits| (about 40 float32 ulps of the logit scale: these random-weight models
# amplify rounding), so no float32 implementation can match the fixtures to 1e-5 absolute
# (max|logits| ~ 6, transformers' own error 2.2e-5). Each float32 result must lie within
# F32_REL * max|logits| of the exact one, hence within twice that of transformers'.
F32_REL = 1e-5
# Every kind, RoPE on half the head dims, GQA, biases, a chunk (8) shorter than the sequences.
CONFIG = HybridConfig(
    layers=("M-", "*-", "*-", "M"),
    d_model=32,
    vocab_size=64,
    d_state=8,
    headdim=16,
    ngroups=2,
    chunk_size=8,
    num_heads=4,
    num_kv_heads=2,
    rotary_dim=4,
    attention_bias=True,
    d_ff=48,
    mlp_bias=True,
)
LENGTHS = [1, 9, 20, 1, 17]


def reference(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    n = len([k for k in ref.files if k.startswith("ids_")])
    return [(ref[f"ids_{i}"], ref[f"logits_{i}"]) for i in range(n)]


def forward(graphdef, params, ids, seg):
    """The model's logits, compiled once per graphdef and shapes (tests/compiled.py)."""

    def run(params, ids, seg):
        return nnx.merge(graphdef, params)(ids, seg)

    return compiled(("hybrid_forward", graphdef), run, params, ids, seg)(params, ids, seg)


def logits_and_grads(model, ids, seg, cotangent):
    graphdef, params = nnx.split(model)

    def run(params, ids, seg, cotangent):
        logits, vjp = jax.vjp(lambda p: nnx.merge(graphdef, p)(ids, seg), params)
        return logits, vjp(cotangent)[0]

    args = (params, ids, seg, cotangent)
    return compiled(("hybrid_vjp", graphdef), run, *args)(*args)


def packed_row(rng):
    seqs = [rng.integers(0, CONFIG.vocab_size, n) for n in LENGTHS]
    ids = np.concatenate(seqs)[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(LENGTHS)])[None]
    return seqs, jnp.asarray(ids, jnp.int32), jnp.asarray(seg, jnp.int32)


def test_layers_runs_and_param_count():
    model = LM(CONFIG, rngs=nnx.Rngs(0))
    # Identical consecutive layers share one stack: ("M-",), ("*-", "*-"), ("M",).
    assert len(model.layers) == 3
    params = nnx.state(model, nnx.Param)
    assert CONFIG.num_params() == sum(x.size for x in jax.tree.leaves(params))
    assert model.layers[1].blocks[0].mixer.q_proj.kernel.shape == (2, 32, 4 * 8)
    assert pair_layers("M-M*-M-M-MM") == ("M-", "M", "*-", "M-", "M-", "M", "M")


def test_packed_batch_gives_each_sequence_its_alone_logits_and_grads():
    model = LM(CONFIG, rngs=nnx.Rngs(2))
    seqs, ids, seg = packed_row(np.random.default_rng(0))
    cot = jax.random.normal(jax.random.key(3), (1, ids.shape[1], CONFIG.padded_vocab_size))
    logits, packed_grads = logits_and_grads(model, ids, seg, cot)
    longest = max(LENGTHS)
    alone_ids = np.zeros((len(seqs), longest), np.int32)
    alone_cot = np.zeros((len(seqs), longest, CONFIG.padded_vocab_size), np.float32)
    starts = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        alone_ids[i, : len(seq)] = seq
        alone_cot[i, : len(seq)] = cot[0, start : start + len(seq)]
    alone, summed = logits_and_grads(model, jnp.asarray(alone_ids), None, jnp.asarray(alone_cot))
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        np.testing.assert_allclose(
            logits[0, start : start + len(seq)], alone[i, : len(seq)], rtol=1e-5, atol=1e-5
        )
    for (path, a), b in zip(jax.tree.leaves_with_path(packed_grads), jax.tree.leaves(summed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_perturbing_one_sequence_leaves_others_bit_identical():
    model = LM(CONFIG, rngs=nnx.Rngs(4))
    seqs, ids, seg = packed_row(np.random.default_rng(1))
    victim = slice(sum(LENGTHS[:2]), sum(LENGTHS[:3]))
    cot = jax.random.normal(jax.random.key(5), (1, ids.shape[1], CONFIG.padded_vocab_size))
    cot = cot.at[:, victim].set(0.0)
    noisy_ids = ids.at[:, victim].set((ids[:, victim] + 7) % CONFIG.vocab_size)
    logits0, grads0 = logits_and_grads(model, ids, seg, cot)
    logits1, grads1 = logits_and_grads(model, noisy_ids, seg, cot)
    assert not np.array_equal(logits0[:, victim], logits1[:, victim])
    keep = np.ones(ids.shape[1], bool)
    keep[victim] = False
    np.testing.assert_array_equal(logits0[:, keep], logits1[:, keep])
    for (path, a), b in zip(jax.tree.leaves_with_path(grads0), jax.tree.leaves(grads1)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@functools.partial(nnx.jit, static_argnums=3)
def prefill_lm(model, ids, seg, num_segments):
    return model(ids, seg, num_segments=num_segments)


@nnx.jit
def step_lm(model, tokens, cache):
    return model(tokens, cache=cache)


def test_prefill_and_step_equal_the_full_forward():
    """Prompts prefilled in one packed row, then decoded token by token from each prompt's
    slot (Mamba2 states and KV caches): the logits of the full forward pass, alone; greedy
    decoding from them is the teacher-forced argmax."""
    model = LM(CONFIG, rngs=nnx.Rngs(6))
    rng = np.random.default_rng(7)
    prompt_lengths, steps = [2, 13, 7], 4
    seqs = [rng.integers(0, CONFIG.vocab_size, n + steps) for n in prompt_lengths]
    ids = np.concatenate([s[:n] for s, n in zip(seqs, prompt_lengths)] + [np.zeros(3, int)])[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(prompt_lengths)] + [np.zeros(3)])[
        None
    ]
    logits, cache = prefill_lm(model, jnp.asarray(ids, jnp.int32), jnp.asarray(seg, jnp.int32), 4)
    assert cache[1][0].k.shape == (2, 1, 4, ids.shape[1], 2, 8)  # (l, b, s, T, k, c)
    assert cache[1][1] is None  # the MLP keeps nothing
    np.testing.assert_array_equal(cache[1][0].length[0, 0], [3, 2, 13, 7])
    # One decoding row per prompt (slots 1, 2, 3), KV room for the new tokens.
    cache = jax.tree.map(lambda x: x[:, 0, 1:], cache)
    cache = jax.tree.map(
        lambda c: pad_kv_cache(c, steps) if isinstance(c, KVCache) else c,
        cache,
        is_leaf=lambda c: isinstance(c, KVCache),
    )
    rows = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        rows[i, : len(s)] = s
    full = np.asarray(forward(*nnx.split(model), jnp.asarray(rows), None))
    ends = np.cumsum(prompt_lengths) - 1
    for i, n in enumerate(prompt_lengths):
        np.testing.assert_allclose(logits[0, ends[i]], full[i][n - 1], rtol=1e-5, atol=1e-5)
    for k in range(steps):
        tokens = jnp.asarray([s[n + k] for s, n in zip(seqs, prompt_lengths)], jnp.int32)
        step_logits, cache = step_lm(model, tokens, cache)
        for i, n in enumerate(prompt_lengths):
            np.testing.assert_allclose(step_logits[i], full[i][n + k], rtol=1e-4, atol=1e-4)
            assert int(jnp.argmax(step_logits[i])) == int(np.argmax(full[i][n + k]))


@functools.cache
def loaded(name):
    return jp.from_pretrained(FIXTURES / name)


def assert_float32_rounding_apart(got, expected, scale, bound, what):
    err = float(np.abs(np.asarray(got, np.float64) - expected).max())
    print(f"{what}: max abs diff {err:.3g} ({err / scale:.2g} * max|logits|)")
    assert err <= bound * scale, f"{what}: max abs diff {err:.3g} > {bound} * {scale:.3g}"


@pytest.mark.parametrize("name", HYBRID_FIXTURES)
def test_checkpoint_matches_transformers_alone_and_packed(name):
    model = loaded(name)
    config = json.loads((FIXTURES / name / "config.json").read_text())
    assert model.config.tie_embeddings == (name == "bamba_tied")
    assert model.config.mlp_activation == ("silu_gated" if name.startswith("bamba") else "relu2")
    hf_layers = config.get("num_hidden_layers") or len(config["layers_block_type"])
    assert len(model.config.blocks) == hf_layers * (2 if name.startswith("bamba") else 1)
    pairs = reference(name)
    graphdef, params = nnx.split(model)
    batch = jp.pack_sequences([ids for ids, _ in pairs], length=128)
    packed = forward(graphdef, params, jnp.asarray(batch.tokens), jnp.asarray(batch.segment_ids))
    for i, ((ids, theirs), got_packed) in enumerate(zip(pairs, jp.unpack(batch, packed))):
        what = f"{name} sequence {i} (length {len(ids)})"
        exact = hf_hybrid_loop.forward(FIXTURES / name, ids)
        scale = float(np.abs(exact).max())
        # The fixture is transformers' float32 rounding of the exact logits.
        assert_float32_rounding_apart(theirs, exact, scale, F32_REL, f"{what}: transformers")
        alone = forward(graphdef, params, jnp.asarray(ids[None], jnp.int32), None)[0]
        for got, how in ((alone, "alone"), (got_packed, "packed")):
            assert_float32_rounding_apart(got, exact, scale, F32_REL, f"{what}: ours {how}")
            assert_float32_rounding_apart(
                got, theirs, scale, 2 * F32_REL, f"{what}: ours {how} vs transformers"
            )


@pytest.mark.parametrize("name", ["bamba", "nemotron_h_small"])
def test_float64_model_is_the_exact_forward(name, monkeypatch):
    """Our model computed in float64 gives hf_hybrid_loop's exact logits: any difference in
    formulation (norm order, RoPE layout and frequencies, scaling, softplus, the D skip, eps)
    would show far above float64 rounding. float64 is no model dtype, so this swaps it in for
    the float32 the model's parameters, residual stream and statistics are pinned to."""
    from jax_packmamba import config as config_lib

    rms_norm_ops = importlib.import_module("jax_packmamba.ops.rms_norm")  # the module

    with jax.enable_x64(True):
        monkeypatch.setattr(jnp, "float32", jnp.float64)
        monkeypatch.setattr(rms_norm_ops, "F32", jnp.float64)  # read once, at import
        monkeypatch.setattr(
            config_lib.HybridConfig, "compute_dtype", property(lambda self: jnp.dtype("float64"))
        )
        monkeypatch.setattr(
            config_lib.Mamba2Config, "compute_dtype", property(lambda self: jnp.dtype("float64"))
        )
        model = jp.from_pretrained(FIXTURES / name)
        graphdef, params = nnx.split(model)
        params = jax.tree.map(
            lambda a: a.astype(np.float64) if a.dtype == np.float32 else a, params
        )
        pairs = reference(name)
        batch = jp.pack_sequences([ids for ids, _ in pairs], length=128)
        packed = nnx.merge(graphdef, params)(
            jnp.asarray(batch.tokens), jnp.asarray(batch.segment_ids)
        )
        assert packed.dtype == jnp.float64
        for (ids, _), got in zip(pairs, jp.unpack(batch, packed)):
            exact = hf_hybrid_loop.forward(FIXTURES / name, ids)
            np.testing.assert_allclose(got, exact, rtol=0, atol=1e-12 * np.abs(exact).max())


@pytest.mark.parametrize("name", ["bamba_tied", "nemotron_h"])
def test_save_then_reload_is_exact(name, tmp_path):
    model = loaded(name)
    jp.save_pretrained(model, tmp_path / "out")
    again = jp.from_pretrained(tmp_path / "out")
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(a, b)
    # Same tensor names and values as the file transformers wrote.
    from safetensors.numpy import load_file

    ours, theirs = (load_file(p / "model.safetensors") for p in (tmp_path / "out", FIXTURES / name))
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_nemotron_h_hybrid_override_pattern_is_read(tmp_path):
    d = tmp_path / "old"
    shutil.copytree(FIXTURES / "nemotron_h", d)
    config = json.loads((d / "config.json").read_text())
    letters = {"linear_attention": "M", "full_attention": "*", "mlp": "-"}
    config["hybrid_override_pattern"] = "".join(letters[t] for t in config.pop("layers_block_type"))
    (d / "config.json").write_text(json.dumps(config))
    assert jp.from_pretrained(d).config == loaded("nemotron_h").config


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.pop("mamba_num_heads"), r"required field.* mamba_num_heads missing"),
        (lambda c: c.update(layers_block_type=["moe"] * 6), r"layers_block_type holds.*moe"),
        (
            lambda c: c.update(layers_block_type=["mamba"] * 5, num_hidden_layers=6),
            r"layers_block_type has 5 entries but num_hidden_layers=6",
        ),
        (
            lambda c: (c.pop("layers_block_type"), c.update(hybrid_override_pattern="M*ME-M")),
            r"hybrid_override_pattern='M\*ME-M' may only hold",
        ),
        (
            lambda c: c.pop("layers_block_type"),
            r"required field layers_block_type \(or the older "
            r"hybrid_override_pattern\) missing",
        ),
        (lambda c: c.update(mlp_hidden_act="gelu"), r"mlp_hidden_act='gelu' is not supported"),
        (lambda c: c.update(ssm_state_size="8"), r"ssm_state_size must be a positive integer"),
    ],
)
def test_bad_nemotron_config_is_one_error_naming_the_field(tmp_path, edit, match):
    d = tmp_path / "bad"
    shutil.copytree(FIXTURES / "nemotron_h", d)
    config = json.loads((d / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: " + match):
        jp.from_pretrained(d)


def test_bad_hybrid_config_and_tensors(tmp_path):
    with pytest.raises(ValueError, match=r"HybridConfig.layers must be .* got \('M-', 'MX'\)"):
        HybridConfig(layers=("M-", "MX"))
    with pytest.raises(ValueError, match=r"num_heads=6 must be a multiple of num_kv_heads=4"):
        HybridConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"rotary_dim must be an even int"):
        HybridConfig(d_model=64, num_heads=4, rotary_dim=3)
    d = tmp_path / "bad"
    shutil.copytree(FIXTURES / "bamba", d)
    config = json.loads((d / "config.json").read_text())
    config["attn_layer_indices"] = [1, 2]  # layer 2's tensors are Mamba2's
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing model.layers.2.self_attn.q_proj.weight"):
        jp.from_pretrained(d)


def test_hybrid_presets_and_a_tiny_hybrid_trains():
    from train import data as data_lib
    from train import sharding
    from train import step as step_lib
    from train.config import ConfigError, MeshConfig, OptimConfig, help_text, parse_args

    assert "layers (comma-separated str)" in help_text()  # --help lists the hybrid's fields

    big = parse_args(["--model.preset=hybrid-1b"]).model.mamba_config(vocab_size=257, backend="gpu")
    assert isinstance(big, HybridConfig) and big.dtype == "bfloat16"
    assert 0.9e9 < HybridConfig.preset("1b").num_params() < 1.5e9
    assert big.blocks.count("*") == 4 and len(big.blocks) == 48
    with pytest.raises(ConfigError, match=r"--model.dt_rank: not a field of the HybridConfig"):
        parse_args(["--model.preset=hybrid-tiny", "--model.dt_rank=4"])
    config = parse_args(
        [
            "--model.preset=hybrid-tiny",
            "--model.layers=M-,*-",
            "--model.d_model=32",
            "--model.d_state=8",
            "--model.num_heads=2",
            "--model.num_kv_heads=1",
            "--model.rotary_dim=8",
            "--model.d_ff=64",
        ]
    )
    mc = config.model.mamba_config(vocab_size=257, backend="cpu")
    assert mc.layers == ("M-", "*-") and mc.rotary_dim == 8
    mesh = sharding.make_mesh(MeshConfig())
    compiled = step_lib.build(mc, OptimConfig(lr=1e-2, warmup_steps=0), 10, mesh)
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 257, n) for n in (50, 9, 33, 64, 20, 17, 40)]
    batch = next(data_lib.Batcher(pieces, mode="packed", seq_len=64, batch_size=4, seed=0))
    arrays = sharding.put_batch(batch["arrays"], sharding.batch_sharding(mesh))
    state = compiled.init(0)
    losses = []
    for _ in range(6):
        state, metrics = compiled.train_step(state, arrays)
        losses.append(float(metrics["loss"]))
    print("losses", losses)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0  # reached: 5.60 -> 4.16


def test_generate_prefills_packed_and_greedy_equals_the_teacher_forced_argmax():
    """jp.generate on a hybrid: every prompt in one packed prefill (Mamba2 states and KV
    caches), then the decode loop with room in the KV caches; greedy tokens are the argmax of
    the full forward pass over prompt + tokens so far, recomputed from scratch."""
    from jax_packmamba import generation

    model = LM(CONFIG, rngs=nnx.Rngs(8))
    prepared = generation.prepare(model)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, CONFIG.vocab_size, n) for n in (1, 8, 13)]
    new = 6
    outputs = generation.generate(prepared, prompts, new, temperature=0)
    # The Mamba2 blocks' decode kernel (through the interpreter) generates the same tokens.
    kernels = generation.generate(
        prepared, prompts, new, temperature=0, decode_impl="pallas_interpret"
    )
    for a, b in zip(outputs, kernels):
        np.testing.assert_array_equal(a, b)
    graphdef, params = nnx.split(model)
    width = 32  # one compile: causal, so the zeros after a sequence change none of its logits
    for p, out in zip(prompts, outputs):
        assert out.shape == (new,)
        seq = list(p)
        for _ in range(new):
            row = np.zeros((1, width), np.int32)
            row[0, : len(seq)] = seq
            logits = forward(graphdef, params, jnp.asarray(row), None)[0, len(seq) - 1]
            seq.append(int(np.argmax(logits[: CONFIG.vocab_size])))
        np.testing.assert_array_equal(out, seq[len(p) :])
    assert len({tuple(o) for o in outputs}) == len(outputs)  # the prompts matter


def test_the_program_does_not_grow_with_the_depth_of_a_run():
    """With scan_layers, runs of identical layers are scanned: 2 or 8 layers per run trace the
    same program size (one copy of each run's layer), forward and backward."""

    def size(layers):
        config = dataclasses.replace(CONFIG, layers=layers, scan_layers=True)
        model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(model)
        ids = jnp.zeros((1, 16), jnp.int32)

        def loss(p):
            return nnx.merge(graphdef, p)(ids, ids).sum()

        return len(str(jax.make_jaxpr(jax.grad(loss))(params)).splitlines())

    shallow = size(("M-",) * 2 + ("*-",) * 2)
    deep = size(("M-",) * 8 + ("*-",) * 8)
    assert shallow == deep
    assert size(("M-", "*-") * 2) > shallow  # four runs of one layer: four copies


def test_runtime_overrides_and_their_errors():
    model = jp.from_pretrained(FIXTURES / "nemotron_h_small", dtype="bfloat16", remat="full")
    assert (model.config.dtype, model.config.remat) == ("bfloat16", "full")
    with pytest.raises(ValueError, match=r"can only override .* not \['d_model'\]"):
        jp.from_pretrained(FIXTURES / "nemotron_h_small", d_model=8)
    with pytest.raises(ValueError, match=r"scan_impl must be one of"):
        jp.from_pretrained(FIXTURES / "nemotron_h_small", scan_impl="nope")
