"""Writes tests/fixtures/parity/mamba3_siso/ and mamba3_mimo/ from mamba_ssm 2.3.2's Mamba3
module (SISO; MIMO rank 4, which needs tilelang: skipped with a message without it), for
tests/test_mamba3_pretrained.py's parity test (which skips while a directory is absent).

mamba_ssm's Mamba3 runs only through its Triton kernels, so this needs a GPU, torch and
mamba_ssm (its MambaLMHeadModel cannot build Mamba3 layers in 2.3.2, so the fixture is one mixer
layer). Random weights (biases and norms moved off their initial values), float32, and:

    config.json         the module's constructor arguments
    weights.safetensors the module's state dict (mamba_ssm's names and shapes)
    reference.npz       u (1, T, d); out (1, T, d) of the sequences alone, concatenated;
                        out_packed (1, T, d) of the same rows packed with cu_seqlens; lengths

Run on the GPU machine from the repository root (--out: where the two folders go, default
tests/fixtures/parity; copy them there to commit):

    PYTHONPATH=/tmp/site python3 scripts/make_mamba3_parity_fixtures.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "parity"
KWARGS = {
    "mamba3_siso": dict(d_model=256, d_state=64, expand=2, headdim=64, ngroups=1, chunk_size=64),
    "mamba3_mimo": dict(
        d_model=256,
        d_state=64,
        expand=2,
        headdim=64,
        ngroups=1,
        chunk_size=16,
        is_mimo=True,
        mimo_rank=4,
    ),
}
LENGTHS = (1, 64, 37, 130)  # a length of 1, one chunk, not a chunk multiple, several chunks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=FIXTURES, help="folder of the fixture folders")
    out = ap.parse_args().out
    for name, kwargs in KWARGS.items():
        try:
            write(out / name, kwargs)
        except (AssertionError, ImportError) as e:  # MIMO without tilelang
            print(f"{name}: not written: {type(e).__name__}: {e}")


def write(out_dir, kwargs):
    import torch
    from mamba_ssm.modules.mamba3 import Mamba3
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = Mamba3(**kwargs, device="cuda", dtype=torch.float32)
    moved = (
        "B_bias",
        "C_bias",
        "B_norm.weight",
        "C_norm.weight",
        "D",
        "mimo_x",
        "mimo_z",
        "mimo_o",
    )
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in moved:
                p.add_(0.3 * torch.randn_like(p))
    module.eval()
    u = torch.randn(1, sum(LENGTHS), kwargs["d_model"], device="cuda")
    with torch.no_grad():
        alone, start = [], 0
        for n in LENGTHS:
            alone.append(module(u[:, start : start + n]))
            start += n
        out = torch.cat(alone, dim=1)
        cu = torch.tensor(np.cumsum((0,) + LENGTHS), dtype=torch.int32, device="cuda")
        out_packed = module(u, cu_seqlens=cu)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(kwargs, indent=2) + "\n")
    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out_dir / "weights.safetensors"))
    np.savez(
        out_dir / "reference.npz",
        u=u.cpu().numpy(),
        out=out.cpu().numpy(),
        out_packed=out_packed.cpu().numpy(),
        lengths=np.asarray(LENGTHS),
    )
    print(f"wrote {out_dir}: {sorted(state)}")


if __name__ == "__main__":
    main()
