"""mamba_ssm's training step, part by part (GPU kernel time per part, torch.profiler), to set
beside benchmarks/breakdown.py --trace for ours. Run on the GPU machine with the anchor:

    PYTHONPATH=/tmp/site:. python3 benchmarks/profile_torch_step.py OUT.json [1.4b,mamba2-1.3b]

The models and step are ../shared/anchor's train_torch.py / mamba2_torch.py ones: fp32
parameters, bf16 autocast, fused AdamW, 8 x 2048 random tokens, tied embeddings.
"""

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from torch.profiler import ProfilerActivity, profile

from benchmarks.step_parts import table

MODELS = {
    "1.4b": (2048, 48, {"layer": "Mamba1"}),
    "mamba2-1.3b": (
        2048,
        48,
        {"layer": "Mamba2", "d_state": 128, "headdim": 64, "chunk_size": 256},
    ),
    "2.8b": (2560, 64, {"layer": "Mamba1"}),
    "mamba2-2.7b": (
        2560,
        64,
        {"layer": "Mamba2", "d_state": 128, "headdim": 64, "chunk_size": 256},
    ),
}


def main(out: str, presets: str = "1.4b,mamba2-1.3b", rows: int = 8, length: int = 2048) -> None:
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for preset in presets.split(","):
        d, n_layer, ssm_cfg = MODELS[preset]
        cfg = MambaConfig(
            d_model=d, n_layer=n_layer, vocab_size=50277, ssm_cfg=ssm_cfg, rms_norm=True,
            residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
            tie_embeddings=True,
        )  # fmt: skip
        model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, 50277, (rows, length + 1), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        steps = 3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        kernel_us = {}
        for e in prof.key_averages():
            if e.device_type.name == "CUDA":
                kernel_us[e.key] = kernel_us.get(e.key, 0.0) + e.device_time_total
        top = sorted(kernel_us.items(), key=lambda kv: -kv[1])[:40]
        row = {
            "preset": preset,
            "rows": rows,
            "len": length,
            "ms": statistics.median(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "busy_ms_per_step": sum(kernel_us.values()) / 1e3 / steps,
            "parts_ms_per_step": table(kernel_us, steps),
            "top_kernels_ms_per_step": [[k[:160], us / 1e3 / steps] for k, us in top],
        }
        res["rows"].append(row)
        print(
            json.dumps({k: v for k, v in row.items() if k != "top_kernels_ms_per_step"}), flush=True
        )
        json.dump(res, open(out, "w"), indent=1)
        model = opt = None  # free them before the next preset
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(*sys.argv[1:])
