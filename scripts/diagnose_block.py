"""Block FP8 on the GPU against the float64 reference and vLLM's block path (diagnosis of the
2026-12-03 GPU failures): gates of ours / vLLM against the reference and each other, and one
small case's inputs, outputs and workspace saved for the interpreter to replay."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ".vllm_stock")

import torch  # noqa: E402

from tests._problems import make, reference_for, run  # noqa: E402
from vllm_moe_aot.measure.reference import gate, reference_moe  # noqa: E402
from vllm_moe_aot.pipeline import FusedMoE  # noqa: E402
from vllm_moe_aot.shapes import MoEShape, Scheme  # noqa: E402

B = Scheme.FP8_BLOCK
OUT = os.environ.get("OUT", "/tmp")


def vllm_block(p):
    import vllm_stock as vs
    return vs.fused_experts(p["x"], p["w13"], p["w2"], p["topk_weights"], p["topk_ids"],
                            scheme="fp8_block", w13_scale=p["w13_scale"],
                            w2_scale=p["w2_scale"])


def compare(shape, M, variants, seed=1):
    moe = FusedMoE(shape, B, "cuda", max_tokens=max(M, 16))
    p = make(shape, B, M, seed=seed, device="cuda")
    rows = torch.randperm(M)[:32]
    y_v = vllm_block(p)
    refq = reference_moe(p["x"][rows.cuda()], p["w13"], p["w2"], p["w13_scale"], p["w2_scale"],
                         p["topk_weights"][rows.cuda()], p["topk_ids"][rows.cuda()], B)
    refw = reference_moe(p["x"][rows.cuda()], p["w13"], p["w2"], p["w13_scale"], p["w2_scale"],
                         p["topk_weights"][rows.cuda()], p["topk_ids"][rows.cuda()], B,
                         quantize_activations=False)
    r = rows.cuda()
    print(f"{shape} M={M}: vllm vs ref_q {gate(y_v[r], refq)}; vs ref_w8a16 {gate(y_v[r], refw)}")
    saved = {}
    for v in variants:
        out = run(moe, v, p).clone()
        torch.cuda.synchronize()
        ref = reference_for(moe, v, p, rows)
        print(f"  {v}: vs own ref {gate(out[r], ref)}; vs vllm {gate(out[r], y_v[r].double())}; "
              f"vs ref_w8a16 {gate(out[r], refw)}; nan={int(out.isnan().sum())}", flush=True)
        ws = moe.ws
        saved[v] = {"out": out.cpu(), "xq": ws.xq.float().cpu(), "a_scale": ws.a_scale.cpu(),
                    "actq": ws.actq.float().cpu(), "act_scale": ws.act_scale.cpu(),
                    "sorted_ids": ws.sorted_ids.cpu(), "block_expert": ws.block_expert.cpu(),
                    "total": ws.total.cpu(), "partial": ws.partial.float().cpu()}
    return p, saved, y_v


if __name__ == "__main__":
    V = ["gemv_n8_k512.k8_n64", "grouped_m16_wstd", "grouped_m64_wloop4", "grouped_m16n64_wstd"]
    compare(MoEShape(512, 4096, 128, 10), 64, V)
    compare(MoEShape(64, 4096, 1024, 10), 64, V)
    compare(MoEShape(4, 384, 256, 2), 7, V)  # the interpreter test's shape
    p, saved, y_v = compare(MoEShape(8, 4096, 128, 2), 16, V)
    torch.save({"p": {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in p.items()},
                "saved": saved, "vllm": y_v.cpu()}, os.path.join(OUT, "blk_case.pt"))
    print("saved", os.path.join(OUT, "blk_case.pt"))
