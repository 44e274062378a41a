"""Run the AOT pipeline at M = 1, 37, 4096 for both presets, once per regime, with poisoned
outputs; meant to run under `compute-sanitizer --tool memcheck` (scripts/gpu_check.sh)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tests._problems import make_tokens, make_weights, run  # noqa: E402
from vllm_moe_aot.pipeline import FusedMoE  # noqa: E402
from vllm_moe_aot.shapes import PRESETS  # noqa: E402


def main() -> int:
    bad = 0
    for name, preset in PRESETS.items():
        g = torch.Generator(device="cuda").manual_seed(7)
        weights = make_weights(preset.shape, preset.scheme, g, device="cuda")
        moe = FusedMoE(preset.shape, preset.scheme, "cuda", max_tokens=4096)
        gemv = next(v for v in moe.variants if moe.regime(v) == "gemv")
        grouped = [v for v in moe.variants if moe.regime(v) == "grouped"]
        for M in (1, 37, 4096):
            p = {**weights, **make_tokens(preset.shape, preset.scheme, M, g, device="cuda")}
            atomic = [v for v in grouped if v.endswith("_atomic")][:1]
            for v in ([gemv] if M <= 256 else []) + [grouped[0], *atomic, grouped[-1]]:
                out = run(moe, v, p)
                torch.cuda.synchronize()
                nan = int(torch.isnan(out).sum())
                bad += nan > 0
                print(f"sanitize {name} M={M} {v}: {'ok' if nan == 0 else f'{nan} NaN'}",
                      flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
