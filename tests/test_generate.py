"""Generation: packed prefill states, recurrent steps against the full forward, sampling;
the command line."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from jax_packmamba.generate import main
from jax_packmamba.generation import (
    DecodeState,
    compile_stats,
    decode_batch,
    generate,
    prefill,
    prefill_batch,
    prepare,
    sample_next_token,
    step,
    stream,
)
from jax_packmamba.sampling import SamplingConfig
from tests.compiled import compiled
from tests.gpu import on_gpu

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
# Lengths around d_conv - 1 = 3 (a shorter prompt's conv window holds zeros) and past a scan
# chunk (64); 70 also makes the packed row 128 long with 5 prompts in 2 rows.
PROMPT_LENGTHS = (1, 2, 3, 9, 70, 40, 17)


@pytest.fixture(scope="module")
def model():
    # The "tied" parity checkpoint: perturbed random weights, so logits are far from uniform.
    return jp.from_pretrained(FIXTURES / "tied")


@pytest.fixture(scope="module")
def prepared(model):
    return prepare(model)


def prompts_of(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]


def last_logits(model, seq, length=128):
    """Full-forward logits at the last token of seq, computed on a fixed-length buffer (the
    model is causal, so what follows seq does not matter) to compile once."""
    ids = np.zeros((1, length), np.int32)
    ids[0, : len(seq)] = seq
    graphdef, params = nnx.split(model)

    def forward(params, ids):
        return nnx.merge(graphdef, params)(ids)

    return compiled(("last_logits", graphdef), forward, params, ids)(params, ids)[0, len(seq) - 1]


def stacked(prefilled):
    """(logits, DecodeState) with the per-layer states stacked (l, p, ...)."""
    logits, state = prefilled
    return logits, DecodeState(jnp.stack(state.conv), jnp.stack(state.ssm))


def test_packed_prefill_states_equal_separate_prefills_and_stepping(model, prepared):
    prompts = prompts_of(PROMPT_LENGTHS, model.config.vocab_size)
    logits, state = stacked(prefill(prepared, prompts))
    config = model.config
    assert state.conv.shape == (config.n_layer, len(prompts), config.d_conv - 1, config.d_inner)
    assert state.ssm.shape == (config.n_layer, len(prompts), config.d_inner, config.d_state)
    for i, p in enumerate(prompts):
        alone_logits, alone = stacked(prefill(prepared, [p]))
        np.testing.assert_allclose(logits[i], alone_logits[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.conv[:, i], alone.conv[:, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.ssm[:, i], alone.ssm[:, 0], rtol=1e-5, atol=1e-5)
        # The same state built one token at a time from zeros by the recurrent step, and the
        # same last logits as the full forward pass.
        stepped = DecodeState(tuple(jnp.zeros_like(alone.conv)), tuple(jnp.zeros_like(alone.ssm)))
        for token in p:
            step_logits, stepped = step(prepared, jnp.asarray([token]), stepped)
        _, stepped = stacked((None, stepped))
        np.testing.assert_allclose(state.conv[:, i], stepped.conv[:, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.ssm[:, i], stepped.ssm[:, 0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits[i], step_logits[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits[i], last_logits(model, p), rtol=1e-5, atol=1e-5)
    # Where a prompt is shorter than the conv window, the window starts with zeros.
    assert np.all(np.asarray(state.conv[:, 0, :2]) == 0) and np.any(
        np.asarray(state.conv[:, 0, 2]) != 0
    )
    assert np.all(np.asarray(state.conv[:, 1, :1]) == 0) and np.all(
        np.any(np.asarray(state.conv[:, 1, 1:]) != 0, axis=-1)
    )


def test_packed_prefill_through_the_pallas_kernel_matches_reference(prepared, model):
    pytest.importorskip("pallas_kernels.selective_scan")
    kernel = prepare(jp.from_pretrained(FIXTURES / "tied", scan_impl="pallas_interpret"))
    prompts = prompts_of((1, 2, 9, 70, 17), model.config.vocab_size, seed=5)
    expected, got = prefill(prepared, prompts), prefill(kernel, prompts)
    for name, a, b in zip(
        ("logits", "conv", "ssm"), jax.tree.leaves(expected), jax.tree.leaves(got)
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_prepared_model_matches_the_model_forward():
    model = jp.from_pretrained(FIXTURES / "tied", dtype="bfloat16")
    # The float32 lookup table, as the model has it (the default table is checked below).
    prepared = prepare(model, embedding_in_compute_dtype=False)
    assert prepared.params["layers"][0]["mixer"]["in_proj"]["kernel"][...].dtype == jnp.bfloat16
    assert prepared.params["layers"][0]["mixer"]["A_log"][...].dtype == jnp.float32
    assert prepared.params["embedding"]["embedding"][...].dtype == jnp.float32
    assert prepared.params["head_embedding"]["embedding"][...].dtype == jnp.bfloat16
    prompts = prompts_of((5, 12), model.config.vocab_size, seed=6)
    # A float32 state (a bfloat16 model's default is bfloat16): the step against the forward.
    logits, state = prefill(prepared, prompts, state_dtype="float32")
    for i, p in enumerate(prompts):
        expected = last_logits(model, p).astype(jnp.float32)
        np.testing.assert_allclose(logits[i], expected, rtol=0, atol=0.04)  # reached: 0.016
    # One step in bfloat16 against the forward over the prompt plus that token.
    step_logits, _ = step(prepared, jnp.asarray([3, 4]), state)
    for i, p in enumerate(prompts):
        expected = last_logits(model, np.append(p, 3 + i)).astype(jnp.float32)
        np.testing.assert_allclose(step_logits[i], expected, rtol=0, atol=0.04)  # reached: 0.013
    # The default stores the table once, in bfloat16 (as mamba_ssm does): the residual stream
    # starts from rounded embeddings, which moves these logits (|logit| <= 5.3) by up to 0.09.
    lean = prepare(model)
    assert lean.params["embedding"]["embedding"][...].dtype == jnp.bfloat16
    assert lean.params["head_embedding"] is None
    lean_logits, _ = prefill(lean, prompts)
    np.testing.assert_allclose(lean_logits, logits, rtol=0, atol=0.15)  # reached: 0.09


def test_greedy_decoding_equals_argmax_of_full_forward(model, prepared):
    prompts = prompts_of((1, 5, 30, 3), model.config.vocab_size, seed=1)
    new = 12
    outputs = generate(prepared, prompts, new, temperature=0)
    for p, out in zip(prompts, outputs):
        assert out.shape == (new,)
        seq = list(p)
        for _ in range(new):
            seq.append(int(jnp.argmax(last_logits(model, seq, 64)[: model.config.vocab_size])))
        np.testing.assert_array_equal(out, seq[len(p) :])
    assert len({tuple(o) for o in outputs}) == len(outputs)  # the prompts matter


def test_eos_stops_each_sequence_and_decoding_compiles_once(prepared, model):
    prompts = prompts_of((4, 11, 6), model.config.vocab_size, seed=2)
    free = generate(prepared, prompts, 10, temperature=0)
    eos = int(free[1][3])  # sequence 1 stops after its 4th token
    stopped = generate(prepared, prompts, 10, temperature=0, eos_id=eos)
    for f, s in zip(free, stopped):
        hits = np.flatnonzero(f == eos)
        expected = f[: hits[0] + 1] if hits.size else f
        np.testing.assert_array_equal(s, expected)
    assert len(stopped[1]) <= 4
    with compile_stats() as stats:
        generate(
            prepared,
            prompts_of((4, 11, 6), model.config.vocab_size, seed=3),
            10,
            temperature=0,
            eos_id=eos,
        )
    assert stats.compiles == 0  # new prompts, same shapes: no recompilation


def test_sampling_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.02, 0.3, 0.2, 0.03]] * 4000))
    keys = jax.random.key(0)

    def draws(**kw):
        return np.asarray(sample_next_token(logits, keys, **kw))

    top3 = draws(top_k=3)
    assert set(top3) == {1, 3, 4}
    # The smallest set of most likely tokens whose mass reaches top_p (0.4, 0.3, 0.2, ...).
    assert set(draws(top_p=0.39)) == {1}
    assert set(draws(top_p=0.41)) == {1, 3}
    assert set(draws(top_p=0.6)) == {1, 3}
    assert set(draws(top_p=0.75)) == {1, 3, 4}
    assert set(draws(top_k=2, top_p=0.99)) == {1, 3}
    assert set(draws(top_p=1e-6)) == {1}
    assert set(draws(temperature=0)) == {1}
    assert set(draws(vocab_size=3, top_k=2)) == {0, 1}  # ids >= vocab_size never drawn
    # Unfiltered draws follow the distribution (4000 draws: 5 sigma is ~0.04).
    freq = np.bincount(draws(), minlength=6) / len(top3)
    np.testing.assert_allclose(freq, [0.05, 0.4, 0.02, 0.3, 0.2, 0.03], atol=0.04)
    # Renormalised within the top 3: 0.4 / 0.9 for token 1.
    assert abs(np.mean(top3 == 1) - 0.4 / 0.9) < 0.04


def test_sampled_generation_is_seeded_and_top_k_1_is_greedy(prepared, model):
    prompts = prompts_of((3, 8), model.config.vocab_size, seed=4)
    a = generate(prepared, prompts, 6, temperature=1.0, seed=1)
    b = generate(prepared, prompts, 6, temperature=1.0, seed=1)
    c = generate(prepared, prompts, 6, temperature=1.0, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    greedy = generate(prepared, prompts, 6, temperature=0)
    top1 = generate(prepared, prompts, 6, temperature=0.7, top_k=1, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(greedy, top1))


def test_bad_generation_arguments(prepared):
    with pytest.raises(ValueError, match="prompts\\[1\\] must be a non-empty"):
        generate(prepared, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="outside \\[0, 64\\)"):
        generate(prepared, [[1, 64]], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(prepared, [[1]], 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(prepared, [[1]], 3, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        generate(prepared, [[1]], 3, top_k=0)
    assert [len(x) for x in generate(prepared, [[1], [2, 3]], 0)] == [0, 0]


def test_command_line_with_byte_tokenizer(tmp_path, capsys):
    config = jp.MambaConfig.preset("tiny", d_model=32)  # vocab 256: bytes
    jp.save_pretrained(jp.MambaLM(config, rngs=nnx.Rngs(0)), tmp_path)
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path),
                "--prompt",
                "Hello",
                "--prompt",
                "Mamba!",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
                "--no-compilation-cache",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert "--- 'Hello'" in out.out and "--- 'Mamba!'" in out.out
    assert "10 tokens in" in out.err and "tokens/s" in out.err


# The command line's errors: one line on stderr, exit code 2, no traceback, before the model
# loads where the flags alone show the problem.

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def byte_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte_model")
    jp.save_pretrained(
        jp.MambaLM(jp.MambaConfig.preset("tiny", d_model=32), rngs=nnx.Rngs(0)), path
    )
    return path


def _bad_inputs(model_dir, tmp):
    """(flags after --checkpoint and --prompt, pattern the one stderr line must match)."""
    not_json = tmp / "tokenizer.json"
    not_json.write_text("not json")
    (tmp / "empty").mkdir(exist_ok=True)
    m = ["--checkpoint", str(model_dir), "--prompt", "a"]
    return [
        ([], "the following arguments are required: --checkpoint, --prompt"),
        (
            ["--checkpoint", str(tmp / "missing"), "--prompt", "a"],
            "--checkpoint .*missing: no such directory",
        ),
        (["--checkpoint", str(not_json), "--prompt", "a"], "--checkpoint .*: not a directory"),
        (
            ["--checkpoint", str(tmp / "empty"), "--prompt", "a"],
            "empty.*config\\.json",
        ),  # from_pretrained's
        (
            m + ["--dtype", "float8"],
            "argument --dtype: invalid choice: 'float8' \\(choose from 'float32', "
            "'bfloat16', 'float16'\\)",
        ),
        (
            m + ["--state-dtype", "float16"],
            "argument --state-dtype: invalid choice: 'float16' \\(choose from 'auto', "
            "'float32', 'bfloat16'\\)",
        ),
        (m + ["--top-p", "2"], "argument --top-p: must be in \\(0, 1\\], got '2'"),
        (m + ["--top-p", "0"], "argument --top-p: must be in \\(0, 1\\], got '0'"),
        (m + ["--top-p", "nan"], "argument --top-p: must be in"),
        (m + ["--top-k", "0"], "argument --top-k: must be an int >= 1, got '0'"),
        (m + ["--top-k", "2.5"], "argument --top-k: must be an int >= 1"),
        (m + ["--min-p", "-0.1"], "argument --min-p: must be in \\[0, 1\\], got '-0.1'"),
        (m + ["--min-p", "1.5"], "argument --min-p: must be in \\[0, 1\\]"),
        (
            m + ["--temperature", "-1"],
            "argument --temperature: must be a finite number >= 0, got '-1'",
        ),
        (m + ["--temperature", "inf"], "argument --temperature: must be a finite number >= 0"),
        (
            m + ["--repetition-penalty", "0"],
            "argument --repetition-penalty: must be a finite number > 0",
        ),
        (
            m + ["--repetition-penalty", "-1.2"],
            "argument --repetition-penalty: must be a finite number > 0",
        ),
        (m + ["--seed", "-1"], "argument --seed: must be an int in \\[0, 2\\*\\*32\\), got '-1'"),
        (m + ["--seed", str(2**32)], "argument --seed: must be an int in"),
        (m + ["--seed", "x"], "argument --seed: must be an int in"),
        (
            m + ["--max-new-tokens", "-1"],
            "argument --max-new-tokens: must be an int >= 0, got '-1'",
        ),
        (m + ["--stream-block", "-1"], "argument --stream-block: must be an int >= 0, got '-1'"),
        (m + ["--eos-id", "-3"], "argument --eos-id: must be an int >= 0"),
        (
            m + [a for i in range(9) for a in ("--eos-id", str(i))],
            "--eos-id given 9 times; at most 8",
        ),
        (
            ["--checkpoint", str(model_dir), "--prompt", "a", "--prompt", ""],
            "--prompt #2 is empty: a prompt needs at least one token",
        ),
        (
            m + ["--tokenizer", str(tmp / "missing.json")],
            "--tokenizer .*missing.json: no such file \\(expected 'bytes' or the path of a tokenizer.json\\)",
        ),
        (
            m + ["--tokenizer", str(not_json)],
            "tokenizer path .*tokenizer.json: cannot load",
        ),  # the library's
        (m + ["--decode-impl", "fast"], "argument --decode-impl: invalid choice"),
        (m + ["--scan-impl", "fast"], "argument --scan-impl: invalid choice"),
        (
            m + ["--compilation-cache", str(not_json / "sub")],
            "compilation cache folder .* cannot be created",
        ),
        (
            m + ["--compilation-cache", str(tmp), "--no-compilation-cache"],
            "argument --no-compilation-cache: not allowed with argument --compilation-cache",
        ),
    ] + (
        []
        if jax.default_backend() == "gpu"
        else [
            (
                m + ["--decode-impl", "pallas"],
                "--decode-impl pallas needs a GPU, but jax runs on 'cpu'",
            ),
            (
                m + ["--scan-impl", "pallas"],
                "--scan-impl pallas needs a GPU, but jax runs on 'cpu'",
            ),
        ]
    )


def test_command_line_bad_input_is_one_line_and_exit_code_2(
    byte_model_dir, tmp_path, capsys, monkeypatch
):
    # Nothing that the flags alone refuse gets as far as loading the model.
    loads = []
    import jax_packmamba.generate as cli

    real = cli.from_pretrained
    monkeypatch.setattr(cli, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    for flags, pattern in _bad_inputs(byte_model_dir, tmp_path):
        loads.clear()
        assert main(flags) == 2, flags
        out = capsys.readouterr()
        assert out.out == "" and "Traceback" not in out.err, (flags, out)
        assert out.err.endswith("\n") and out.err.count("\n") == 1, (flags, out.err)
        assert re.fullmatch(f"error: .*{pattern}.*\n", out.err), (flags, out.err)
        assert loads == [] or str(tmp_path / "empty") in flags, flags


@pytest.mark.parametrize("case", ["missing checkpoint", "not a model directory"])
def test_command_line_errors_print_no_traceback_in_a_real_process(case, tmp_path, byte_model_dir):
    flags = {
        "missing checkpoint": ["--checkpoint", str(tmp_path / "nope"), "--prompt", "a"],
        "not a model directory": ["--checkpoint", str(tmp_path), "--prompt", "a"],
    }[case]
    # -W error: the package does not import its command-line module, so `python -m` finds it
    # unloaded (runpy warns, and here fails, when the module was already imported).
    res = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "jax_packmamba.generate", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert res.returncode == 2 and res.stdout == "", res
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr


def test_command_line_prompt_outside_the_model_vocabulary(tmp_path, capsys):
    config = jp.MambaConfig.preset("tiny", d_model=16, vocab_size=64, pad_vocab_size_multiple=1)
    jp.save_pretrained(jp.MambaLM(config, rngs=nnx.Rngs(0)), tmp_path)
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path),
                "--prompt",
                "a",
                "--prompt",
                "0z",
                "--no-compilation-cache",
            ]
        )
        == 2
    )
    out = capsys.readouterr()
    assert out.out == "" and out.err == (
        "error: --prompt #1 encodes to token ids up to 97 with "
        "the tokenizer bytes, but the model has 64 (--tokenizer picks the model's own)\n"
    )
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path),
                "--prompt",
                "0",
                "--eos-id",
                "3",
                "--eos-id",
                "64",
                "--no-compilation-cache",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err == (
        "error: --eos-id 64 is outside the model's vocabulary: token ids are in [0, 64)\n"
    )


def test_command_line_max_new_tokens_0_prints_the_prompts(byte_model_dir, capsys):
    for stream_block in ("8", "0"):  # one prompt streamed, and printed at the end
        assert (
            main(
                [
                    "--checkpoint",
                    str(byte_model_dir),
                    "--prompt",
                    "Hi",
                    "--max-new-tokens",
                    "0",
                    "--stream-block",
                    stream_block,
                    "--no-compilation-cache",
                ]
            )
            == 0
        )
        out = capsys.readouterr()
        assert out.out == "--- 'Hi'\nHi\n", out.out
        assert out.err.splitlines()[-1].startswith("0 tokens in"), out.err
    assert (
        main(
            [
                "--checkpoint",
                str(byte_model_dir),
                "--prompt",
                "ab",
                "--prompt",
                "c",
                "--max-new-tokens",
                "0",
                "--no-compilation-cache",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == "--- 'ab'\nab\n--- 'c'\nc\n"


def test_command_line_help_describes_every_option():
    from jax_packmamba.generate import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        assert action.help and len(action.help) > 30, flag
        assert "required" in action.help if action.required else "(default: " in action.help, flag
    text = parser.format_help()
    for allowed in (
        "in (0, 1]",
        "in [0, 1]",
        "an int >= 1",
        "a number > 0",
        "a number >= 0",
        "[0, 2**32)",
        "{float32,bfloat16,float16}",
        "'bytes'",
        "at most 8",
    ):
        assert allowed in " ".join(text.split()), allowed


_CACHE_PROBE = """
import sys
import jax
from jax_packmamba.generate import main
code = main(sys.argv[1:])
print("cache dir:", jax.config.jax_compilation_cache_dir)
sys.exit(code)
"""


@pytest.mark.parametrize("flag", ["--compilation-cache", "default"])
def test_command_line_compilation_cache_flags(flag, tmp_path, byte_model_dir):
    # In a fresh process: the cache is global jax state that other tests must not inherit.
    chosen, from_env = tmp_path / "chosen", tmp_path / "from_env"
    flags = {"--compilation-cache": ["--compilation-cache", str(chosen)], "default": []}[flag]
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            _CACHE_PROBE,
            "--checkpoint",
            str(byte_model_dir),
            "--prompt",
            "a",
            "--max-new-tokens",
            "0",
            *flags,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_PACKMAMBA_CACHE_DIR=str(from_env)),
    )
    assert res.returncode == 0, res.stderr
    folder = {"--compilation-cache": chosen, "default": from_env}[flag]
    assert res.stdout.splitlines()[-1] == f"cache dir: {folder}"
    assert f"compilation cache: {folder} (--no-compilation-cache turns it off)" in res.stderr
    assert any(folder.iterdir())  # the compiled programs were written there


def test_command_line_without_the_compilation_cache(tmp_path, byte_model_dir, capsys, monkeypatch):
    # In this process: --no-compilation-cache leaves jax's cache settings as they are.
    monkeypatch.setenv("JAX_PACKMAMBA_CACHE_DIR", str(tmp_path / "from_env"))
    before = jax.config.jax_compilation_cache_dir
    assert (
        main(
            [
                "--checkpoint",
                str(byte_model_dir),
                "--prompt",
                "a",
                "--max-new-tokens",
                "0",
                "--no-compilation-cache",
            ]
        )
        == 0
    )
    assert jax.config.jax_compilation_cache_dir == before
    assert "compilation cache" not in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_pallas_decode_step_generates_what_the_xla_step_does(prepared, model):
    # The decode kernels through the interpreter, inside the jitted loop, greedy and sampled.
    prompts = prompts_of((3, 9, 1), model.config.vocab_size, seed=7)
    for sampling in (dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=3)):
        xla = generate(prepared, prompts, 6, decode_impl="xla", **sampling)
        kernels = generate(prepared, prompts, 6, decode_impl="pallas_interpret", **sampling)
        for a, b in zip(xla, kernels):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", ["pallas_interpret", on_gpu("pallas")])
def test_add_norm_in_proj_step_as_the_xla_step_does(impl, decode_rule):
    # One step's logits and states against the XLA step's, with a Mamba1 block's residual add
    # and norm inside its fused in_proj kernel (MambaMixer.decode_after_add, pick_config's
    # add_norm_in_proj; off by default). d_model 128 and d_inner 256 tile the fused kernel.
    decode_rule("ADD_NORM_IN_PROJ_ROWS", 16)
    config = jp.MambaConfig.preset("tiny", d_model=128, n_layer=2)
    prepared = prepare(jp.MambaLM(config, rngs=nnx.Rngs(1)))
    prompts = prompts_of((3, 9, 1), config.vocab_size, seed=5)
    _, state = prefill(prepared, prompts)
    tokens = jnp.asarray([5, 7, 2])
    want = step(prepared, tokens, state, decode_impl="xla")
    got = step(prepared, tokens, state, decode_impl=impl)
    tol = 1e-5 if jax.default_backend() == "cpu" else 5e-3  # a GPU's XLA step: TF32 products
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", ["pallas_interpret", on_gpu("pallas")])
def test_state_kernel_summing_the_partials_steps_as_the_xla_step_does(impl, decode_rule):
    # Batch 1 (one row a program) with Mamba1's state kernel summing x_proj's partials itself
    # (STATE_SUMS_PARTS_ROWS; off by default), behind the fused in_proj kernel (d_model 128
    # and d_inner 256 tile it: 4 partials).
    decode_rule("STATE_SUMS_PARTS_ROWS", 1)
    config = jp.MambaConfig.preset("tiny", d_model=128, n_layer=2)
    prepared = prepare(jp.MambaLM(config, rngs=nnx.Rngs(2)))
    _, state = prefill(prepared, prompts_of((5,), config.vocab_size, seed=6))
    tokens = jnp.asarray([3])
    want = step(prepared, tokens, state, decode_impl="xla")
    got = step(prepared, tokens, state, decode_impl=impl)
    tol = 1e-5 if jax.default_backend() == "cpu" else 5e-3  # a GPU's XLA step: TF32 products
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_repetition_penalty_follows_hugging_face_in_the_loop(model, prepared):
    # Greedy with a penalty: each token is the argmax of the full forward's logits with every
    # token seen so far (prompt and generated) divided (positive) or multiplied (negative).
    prompts = prompts_of((4, 7), model.config.vocab_size, seed=8)
    new, penalty = 8, 1.8
    outputs = generate(prepared, prompts, new, temperature=0, repetition_penalty=penalty)
    plain = generate(prepared, prompts, new, temperature=0)
    for p, out in zip(prompts, outputs):
        seq = list(p)
        for _ in range(new):
            logits = np.asarray(last_logits(model, seq, 64)[: model.config.vocab_size], np.float64)
            seen = np.unique(seq)
            logits[seen] = np.where(
                logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty
            )
            seq.append(int(np.argmax(logits)))
        np.testing.assert_array_equal(out, seq[len(p) :])
    assert any(not np.array_equal(a, b) for a, b in zip(outputs, plain))  # the penalty acted


def test_several_eos_ids_stop_each_sequence_at_the_first_of_them(prepared, model):
    prompts = prompts_of((4, 11, 6), model.config.vocab_size, seed=2)
    free = generate(prepared, prompts, 10, temperature=0)
    eos = (int(free[0][5]), int(free[2][2]))
    stopped = generate(prepared, prompts, 10, temperature=0, eos_ids=eos)
    for f, s in zip(free, stopped):
        hits = np.flatnonzero(np.isin(f, eos))
        np.testing.assert_array_equal(s, f[: hits[0] + 1] if hits.size else f)
    assert len(stopped[2]) <= 3


def test_repeat_calls_in_the_same_buckets_compile_nothing(prepared, model):
    vocab = model.config.vocab_size
    # 3 and 4 prompts share the batch bucket 4; lengths up to 32 share one packed row length;
    # 10 and 13 new tokens share the bucket 16; every sampling value is traced.
    first = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.2, seed=0)
    second = dict(
        temperature=1.3,
        top_p=0.5,
        top_k=5,
        min_p=0.05,
        repetition_penalty=1.0,
        eos_ids=(3, 4),
        seed=11,
    )
    generate(prepared, prompts_of((5, 20, 9), vocab, seed=9), 10, **first)
    with compile_stats() as stats:
        out = generate(prepared, prompts_of((17, 2, 30, 8), vocab, seed=10), 13, **second)
    assert stats.compiles == 0, stats
    assert [len(o) <= 13 for o in out] == [True] * 4
    # A new new-token bucket (64) compiles the loop again (or loads it from a persistent
    # compilation cache).
    with compile_stats() as stats:
        generate(prepared, prompts_of((5, 20, 9), vocab, seed=9), 40, **first)
    assert stats.compiles + stats.cache_hits >= 1 and stats.seconds > 0, stats


@pytest.mark.parametrize("backend", ["cpu", on_gpu("gpu")])
def test_large_batches_decode_with_cublas_gemms_and_the_same_tokens(
    backend, prepared, model, monkeypatch
):
    # From CUBLAS_GEMM_ROWS rows the loop is jitted with XLA's Triton GEMM fusions off (an XLA
    # GPU option: on a CPU it changes nothing, so the tokens must be bit-identical; on a GPU
    # its compiled loop holds fewer Triton GEMMs).
    from jax_packmamba import generation as gen

    assert gen.decode_loop_for(gen.CUBLAS_GEMM_ROWS) is gen._decode_loop_cublas
    assert gen.decode_loop_for(gen.CUBLAS_GEMM_ROWS - 1) is gen._decode_loop
    prompts = prompts_of((4, 11, 6), model.config.vocab_size, seed=21)
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, seed=5)
    want = decode_batch(prepared, prefill_batch(prepared, prompts), 7, sampling)
    monkeypatch.setattr(gen, "CUBLAS_GEMM_ROWS", 1)
    gen._decode_loop_cublas.clear_cache()
    got = decode_batch(prepared, prefill_batch(prepared, prompts), 7, sampling)
    assert gen._decode_loop_cublas._cache_size() == 1  # decode_batch ran this loop
    if backend == "cpu":
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        return
    run = gen._begin(prepared, prefill_batch(prepared, prompts), 7, sampling)
    args = (prepared, run, jnp.int32(7), sampling.params())
    kw = dict(mode=sampling.mode, impl="pallas", vocab_size=model.config.vocab_size)
    texts = [
        loop.lower(*args, **kw).compile().as_text()
        for loop in (gen._decode_loop_cublas, gen._decode_loop)
    ]
    # The option reaches XLA: the programs differ, and the cuBLAS one holds no more Triton GEMM
    # fusions (either name) than the other. Which of the tiny model's products XLA gives Triton
    # varies: one H100 run found some left in the cuBLAS loop, a later one none in either.
    assert texts[0] != texts[1]
    triton_gemms = [len(re.findall(r"__triton\w*gemm", t)) for t in texts]
    assert triton_gemms[0] <= triton_gemms[1], triton_gemms


def test_streaming_yields_growing_prefixes_of_the_unstreamed_result(prepared, model):
    prompts = prompts_of((5, 12), model.config.vocab_size, seed=12)
    sampling = SamplingConfig(temperature=0.9, top_k=20, seed=4)
    whole, count = decode_batch(prepared, prefill_batch(prepared, prompts), 11, sampling)
    seen = []
    for tokens, counts in stream(prepared, prefill_batch(prepared, prompts), 11, sampling, block=3):  # noqa: B007 (the last one is checked below)
        seen.append(tokens.shape[1])
        np.testing.assert_array_equal(tokens, whole[:, : tokens.shape[1]])
    assert seen == [1, 4, 7, 10, 11]
    np.testing.assert_array_equal(counts, count)


def test_command_line_streams_one_prompt_with_the_sampling_flags(tmp_path, capsys):
    config = jp.MambaConfig.preset("tiny", d_model=32)
    jp.save_pretrained(jp.MambaLM(config, rngs=nnx.Rngs(0)), tmp_path)
    common = [
        "--checkpoint",
        str(tmp_path),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "7",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--min-p",
        "0.01",
        "--repetition-penalty",
        "1.3",
        "--seed",
        "5",
        "--decode-impl",
        "xla",
        "--no-compilation-cache",
    ]
    assert main(common + ["--stream-block", "2"]) == 0
    streamed = capsys.readouterr()
    assert main(common + ["--stream-block", "0"]) == 0
    whole = capsys.readouterr()
    assert streamed.out.startswith("--- 'Hi'\nHi")
    assert streamed.out == whole.out  # the same text, streamed in blocks or not
    assert "7 tokens in" in streamed.err and "time to first token" in streamed.err


def test_decode_loop_lowers_for_cuda_with_two_kernels_a_layer(decode_rule):
    # The whole jitted loop, as a GPU runs it: every layer's step calls the two decode kernels
    # (pallas_kernels/decode), and no layer-stacked weight is sliced inside the loop.
    from jax_packmamba import generation as gen
    from jax_packmamba.sampling import SamplingConfig
    from tests.gpu import lower_for_cuda

    config = jp.MambaConfig.preset("tiny", n_layer=3, dtype="bfloat16", d_state=16)
    prepared = prepare(jp.MambaLM(config, rngs=nnx.Rngs(0)))
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    sds = jax.ShapeDtypeStruct
    size, vocab = 4, config.padded_vocab_size
    store = gen.resolve_state_dtype(None, config)  # the default: the model's bfloat16
    state = DecodeState(
        conv=(sds((size, config.d_conv - 1, config.d_inner), jnp.bfloat16),) * 3,
        ssm=(sds((size, config.d_inner, config.d_state), store),) * 3,
    )
    run = jax.eval_shape(
        lambda *a: gen._start(*a, mode=sampling.mode, vocab_size=config.vocab_size, columns=16),
        sds((size, vocab), jnp.float32),
        state,
        sds((size, vocab), jnp.bool_),
        jax.random.key(0),
        sampling.params(),
        jnp.int32(3),
    )
    import pallas_kernels.decode  # noqa: F401  (before tracing: its __init__ says why)

    text = lower_for_cuda(
        lambda m, r, p: gen._decode_loop(
            m, r, jnp.int32(16), p, mode=sampling.mode, impl="pallas", vocab_size=config.vocab_size
        ),
        prepared,
        run,
        sampling.params(),
        auto_axes=True,
    )
    # A layer's step is one function (generation._layer_step, lowered once) holding the three
    # kernels (the previous block's residual add with this block's norm, and the mixer's two);
    # the loop calls it once per layer, each with that layer's own weights and states. The
    # last residual add and the final norm are one more add-norm kernel.
    layer_step = text.split("func.func private @_layer_step(", 1)[1].split("func.func", 1)[0]
    names = re.findall(r'name = "(decode_[a-z_]+)"', layer_step)
    assert sorted(names) == ["decode_add_rms_norm", "decode_conv_x_proj", "decode_ssm_update"]
    assert len(re.findall(r'name = "decode_', text)) == 4
    calls = re.findall(r"call @_layer_step\(([^)]*)\)", text.split("stablehlo.while", 1)[1])
    assert len(calls) == 3 and len(set(calls)) == 3, calls
    # The loop's only dynamic slices are sampling's k-th largest logit per row (4 x 1).
    loop = text.split("stablehlo.while", 1)[1]
    slices = re.findall(r"stablehlo.dynamic_slice[^\n]*-> tensor<([^>]*)>", loop)
    assert slices and set(slices) == {"4x1xf32"}, slices
    # A model whose widths tile the fused in_proj kernel, with the add + norm in it: one
    # kernel fewer a layer (the final norm keeps its own).
    decode_rule("ADD_NORM_IN_PROJ_ROWS", 16)
    wide = jp.MambaConfig.preset("tiny", n_layer=3, dtype="bfloat16", d_state=16, d_model=128)
    state = DecodeState(
        conv=(sds((size, wide.d_conv - 1, wide.d_inner), jnp.bfloat16),) * 3,
        ssm=(sds((size, wide.d_inner, wide.d_state), store),) * 3,
    )
    run = run._replace(state=state)
    text = lower_for_cuda(
        lambda m, r, p: gen._decode_loop(
            m, r, jnp.int32(16), p, mode=sampling.mode, impl="pallas", vocab_size=wide.vocab_size
        ),
        prepare(jp.MambaLM(wide, rngs=nnx.Rngs(0))),
        run,
        sampling.params(),
        auto_axes=True,
    )
    layer_step = text.split("func.func private @_layer_step(", 1)[1].split("func.func", 1)[0]
    names = re.findall(r'name = "(decode_[a-z_]+)"', layer_step)
    assert sorted(names) == ["decode_add_norm_in_proj_conv", "decode_ssm_update"], names
    assert len(re.findall(r'name = "decode_', text)) == 3


def test_importing_the_cli_keeps_jp_generate_callable():
    import jax_packmamba as jp
    import jax_packmamba.generate  # noqa: F401  (sets jp.generate to the CLI module)
    from jax_packmamba.generation import generate as library_generate

    config = jp.MambaConfig.preset("tiny")
    model = jp.MambaLM(config, rngs=nnx.Rngs(0))
    prompts = [np.array([1, 2, 3], np.int32)]
    got = jp.generate(model, prompts, 3, temperature=0.0)
    want = library_generate(model, prompts, 3, temperature=0.0)
    assert [list(g) for g in got] == [list(w) for w in want]


def test_pallas_decode_off_a_gpu_names_decode_impl():
    if jax.default_backend() == "gpu":
        pytest.skip("checks the message off a GPU")
    model = jp.MambaLM(jp.MambaConfig.preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match='decode_impl="pallas".*decode_impl="pallas_interpret"'):
        generate(model, [[1, 2]], 2, decode_impl="pallas")
