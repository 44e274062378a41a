"""Run the AOT pipeline with poisoned outputs, meant to run under compute-sanitizer
(scripts/gpu_check.sh): memcheck over both presets at M = 1, 37, 4096 (once per regime), and
(``--layers ep8``) one grouped and one gemv variant of each EP8 layer (rank 0 of 8, vLLM's
expert map) at ``--tokens``, for memcheck and racecheck."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tests._problems import make_tokens, make_weights, run  # noqa: E402
from vllm_moe_aot.dispatch.configs import preset_shape  # noqa: E402
from vllm_moe_aot.pipeline import FusedMoE  # noqa: E402
from vllm_moe_aot.shapes import PRESETS, MoEShape  # noqa: E402


def _poisoned_run(label: str, moe: FusedMoE, v: str, p: dict) -> int:
    out = run(moe, v, p)
    torch.cuda.synchronize()
    nan = int(torch.isnan(out).sum())
    print(f"sanitize {label} M={p['x'].shape[0]} {v}: {'ok' if nan == 0 else f'{nan} NaN'}",
          flush=True)
    return int(nan > 0)


def presets(only: list[str]) -> int:
    bad = 0
    for name, preset in _chosen(only):
        g = torch.Generator(device="cuda").manual_seed(7)
        weights = make_weights(preset.shape, preset.scheme, g, device="cuda")
        moe = FusedMoE(preset.shape, preset.scheme, "cuda", max_tokens=4096)
        gemv = next(v for v in moe.variants if moe.regime(v) == "gemv")
        grouped = [v for v in moe.variants if moe.regime(v) == "grouped"]
        for M in (1, 37, 4096):
            p = {**weights, **make_tokens(preset.shape, preset.scheme, M, g, device="cuda")}
            atomic = [v for v in grouped if v.endswith("_atomic")][:1]
            for v in ([gemv] if M <= 256 else []) + [grouped[0], *atomic, grouped[-1]]:
                bad += _poisoned_run(name, moe, v, p)
    return bad


def _chosen(only: list[str]):
    """The presets named in ``only`` (all when empty)."""
    return [(n, p) for n, p in PRESETS.items() if not only or n in only]


def ep8(tokens: list[int], only: list[str], variants: list[str]) -> int:
    """One grouped variant that re-quantises per N tile where the scheme needs it (else the
    first grouped one), or the grouped ``variants`` the layer builds, and one gemv variant,
    per EP8 layer."""
    bad = 0
    for name, preset in _chosen(only):
        shape = preset_shape(preset, tp=1, ep=8)
        local = MoEShape(shape.E, shape.K, shape.N, shape.topk)
        g = torch.Generator(device="cuda").manual_seed(11)
        weights = make_weights(local, preset.scheme, g, device="cuda")
        moe = FusedMoE(shape, preset.scheme, "cuda", max_tokens=max(tokens))
        grouped = [v for v in moe.variants if moe.regime(v) == "grouped"]
        wide = [v for v in grouped if moe.act_group(v)]
        chosen = [v for v in variants if v in grouped] if variants else [(wide or grouped)[0]]
        gemv = next(v for v in moe.variants if moe.regime(v) == "gemv")
        G = shape.global_experts
        emap = torch.full((G,), -1, dtype=torch.int32, device="cuda")
        emap[:shape.E] = torch.arange(shape.E, dtype=torch.int32, device="cuda")
        for M in tokens:
            ids = torch.rand(M, G, generator=g, device="cuda").argsort(dim=1)[:, :shape.topk]
            p = {**weights, **make_tokens(local, preset.scheme, M, g, device="cuda", ids=ids),
                 "expert_map": emap}
            for v in (*chosen, gemv):
                bad += _poisoned_run(f"{name} ep8", moe, v, p)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", choices=["presets", "ep8"], default="presets")
    ap.add_argument("--tokens", type=int, nargs="+", default=[37],
                    help="token counts for --layers ep8")
    ap.add_argument("--only", nargs="+", default=[], choices=list(PRESETS), metavar="PRESET",
                    help="only these presets (default: all)")
    ap.add_argument("--variants", nargs="+", default=[], metavar="VARIANT",
                    help="--layers ep8: these grouped variants (where the layer builds them) "
                         "instead of the default one")
    args = ap.parse_args(argv)
    bad = (presets(args.only) if args.layers == "presets"
           else ep8(args.tokens, args.only, args.variants))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
