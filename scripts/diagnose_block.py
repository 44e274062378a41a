"""Block FP8 on the GPU against the float64 reference and vLLM's block path (diagnosis of the
2026-12-03 GPU failures): gates of ours / vLLM against the reference and each other, and one
small case's inputs, outputs and workspace saved for the interpreter to replay:

    python3 scripts/diagnose_block.py            # on the GPU: writes $OUT/blk_case.pt
    TRITON_INTERPRET=1 python3 scripts/diagnose_block.py --replay blk_case.pt  # on the CPU
"""

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
                    "total": ws.total.cpu()}
    return p, saved, y_v


#: the small case saved for the interpreter (E=4 keeps the file under the device tool's 16 MiB)
CASE = MoEShape(4, 4096, 128, 2)
CASE_M = 16
VARIANTS = ["gemv_n8_k512.k8_n64", "grouped_m16_wstd", "grouped_m64_wloop4", "grouped_m16n64_wstd"]


def replay(path: str) -> None:
    """Run the saved GPU case through Triton's interpreter (set TRITON_INTERPRET=1) and say,
    buffer by buffer, where the GPU's workspace and output differ from the interpreter's."""
    case = torch.load(path)
    p, saved = case["p"], case["saved"]
    moe = FusedMoE(CASE, B, "cpu", max_tokens=CASE_M)
    for v, gpu in saved.items():
        out = run(moe, v, p)
        ref = reference_for(moe, v, p)
        print(f"{v}: interpreter vs ref {gate(out, ref)}; GPU vs ref {gate(gpu['out'], ref)}")
        if moe.regime(v) != "grouped":
            continue  # the gemv regime quantises nothing
        ws = moe.ws
        here = {"xq": ws.xq.float(), "a_scale": ws.a_scale, "actq": ws.actq.float(),
                "act_scale": ws.act_scale, "sorted_ids": ws.sorted_ids, "total": ws.total}
        pairs = p["topk_ids"].numel()
        group = moe.act_group(v)  # stage 1 stores act_scale[row * tiles + tile]
        tiles = -(-CASE.N // group) if group else 1
        rows = ws.actq.shape[0]
        for name in ("xq", "a_scale"):  # per token: same layout on both sides
            _diff(name, here[name].flatten(), gpu[name].float().flatten())
        # per sorted row: the scatter's order inside an expert is not fixed, so compare by pair
        a_rows, b_rows = _rows_by_pair(here, pairs), _rows_by_pair(gpu, pairs)
        _diff("actq", here["actq"][a_rows], gpu["actq"].float()[b_rows])
        _diff("act_scale", here["act_scale"][:rows * tiles].view(rows, tiles)[a_rows],
              gpu["act_scale"][:rows * tiles].view(rows, tiles)[b_rows])


def _rows_by_pair(ws: dict, pairs: int) -> torch.Tensor:
    """The sorted rows holding pairs 0..pairs-1, in pair order."""
    ids = ws["sorted_ids"][:int(ws["total"])].long()
    rows = (ids < pairs).nonzero().flatten()
    return rows[ids[rows].argsort()]


def _diff(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    d = (a.float() - b.float()).abs()
    print(f"  {name}: {int((d > 0).sum())} of {d.numel()} elements differ, "
          f"max {float(d.max()):.3e}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replay":
        replay(sys.argv[2])
        sys.exit(0)
    compare(MoEShape(512, 4096, 128, 10), 64, VARIANTS)
    compare(MoEShape(64, 4096, 1024, 10), 64, VARIANTS)
    compare(MoEShape(4, 384, 256, 2), 7, VARIANTS)  # the interpreter test's shape
    p, saved, y_v = compare(CASE, CASE_M, VARIANTS)
    torch.save({"p": {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in p.items()},
                "saved": saved, "vllm": y_v.cpu()}, os.path.join(OUT, "blk_case.pt"))
    print("saved", os.path.join(OUT, "blk_case.pt"))
