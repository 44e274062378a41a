"""Compiling one object (runs in the build's worker processes): ``triton.compile`` of one
spec for one target, with the launch parameters read back from the compiled ELF."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import sys
import traceback
from typing import Any

from kernels.build import TARGETS, BuildError, _json_const, triton_version

#: scratch pointers Triton appends after the user's parameters, in order, when its metadata
#: has the matching ``<name>_size`` field (Triton 3.6 - 3.8: both, always)
APPENDED = ("global_scratch", "profile_scratch")
APPENDED_TYPE = "*i8"


# ---- compiling one object (runs in worker processes) --------------------------------------------
def _import_fn(source: str) -> Any:
    mod, _, name = source.partition(":")
    return getattr(importlib.import_module(mod), name)


def _ptxas_version() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(90)
        out = tool.version if isinstance(tool.version, str) else str(tool.version)
        try:
            import subprocess

            text = subprocess.run([tool.path, "--version"], capture_output=True, text=True,
                                  timeout=30).stdout
            m = re.search(r"V(\d+\.\d+\.\d+)", text)
            if m:
                out = m.group(1)
        except Exception:  # noqa: BLE001
            pass
        return out
    except Exception:  # noqa: BLE001
        return None


def _llvm_version(binary: bytes) -> str | None:
    import io

    from elftools.elf.elffile import ELFFile

    try:
        sec = ELFFile(io.BytesIO(binary)).get_section_by_name(".comment")
        if sec is None:
            return None
        text = sec.data().split(b"\0")[0].decode(errors="replace")
        return text.removeprefix("Linker: ").strip() or None
    except Exception:  # noqa: BLE001
        return None


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def compile_payload(p: dict[str, Any]) -> tuple[str, Any, Any]:
    """Compile one object. Returns ("ok", entry, bytes) or ("error", message, None)."""
    try:
        with _env("TRITON_CACHE_DIR", p["cache_dir"]):
            entry, binary = _compile(p)
        return "ok", entry, binary
    except Exception as e:  # noqa: BLE001 - reported per object, the build goes on
        msg = f"{type(e).__name__}: {e}".strip()
        if not str(e).strip():
            msg += "\n" + traceback.format_exc(limit=5)
        return "error", msg[:6000], None


def _compile(p: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_moe_aot.runtime.elf import kernel_params
    from vllm_moe_aot.runtime.params import layout

    name, target = p["name"], TARGETS[p["target"]]
    fn = _import_fn(p["source"])
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise BuildError(f"{p['source']} is not a Triton @jit function compiled for GPUs "
                         f"(is TRITON_INTERPRET set?)")
    sig: dict[str, str] = p["signature"]
    consts: dict[str, Any] = p["constexprs"]
    args = list(fn.arg_names)
    missing = [a for a in args if a not in sig and a not in consts]
    extra = [a for a in list(sig) + list(consts) if a not in args]
    both = [a for a in sig if a in consts]
    if missing or extra or both:
        raise BuildError(f"spec does not match {p['source']}{tuple(args)}: missing {missing}, "
                         f"unknown {extra}, both signature and constexpr {both}")
    order = [a for a in args if a in sig]
    if order != list(sig):
        raise BuildError(f"signature order {list(sig)} differs from the kernel's {order}; list "
                         f"the parameters in the kernel's own order (it is the launch order)")
    bad_div = [d for d in p["divisible_by_16"] if d not in sig]
    if bad_div:
        raise BuildError(f"divisible_by_16 names {bad_div}, which are not signature parameters")
    full_sig = {a: (sig[a] if a in sig else "constexpr") for a in args}
    attrs = {(args.index(d),): [["tt.divisibility", 16]] for d in p["divisible_by_16"]}
    src = ASTSource(fn, signature=full_sig, constexprs=consts, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget(target.backend, target.arch, target.warp_size),
                        options={"num_warps": p["num_warps"], "num_stages": p["num_stages"]})
    binary: bytes = ck.asm[target.suffix]
    md = ck.metadata
    symbol = md.name

    # the launch parameters, from the artifact
    declared = kernel_params(binary, symbol)
    appended = [a for a in APPENDED if hasattr(md, f"{a}_size")]
    if len(declared) != len(sig) + len(appended):
        raise BuildError(
            f"the compiled kernel declares {len(declared)} parameters; expected the "
            f"{len(sig)} of the signature plus {len(appended)} appended by Triton "
            f"{triton_version()}"
            f" ({appended}). This Triton changed its calling convention: update APPENDED in "
            f"kernels/compile.py"
        )
    params = [{"name": a, "type": t, "appended": False} for a, t in sig.items()]
    params += [{"name": a, "type": APPENDED_TYPE, "appended": True} for a in appended]
    ours = layout([q["type"] for q in params])
    theirs = [(d.offset, d.size) for d in declared]
    if ours != theirs:
        raise BuildError(f"parameter layout {ours} (from the signature) differs from the code "
                         f"object's {theirs}; check the signature's types")
    for q, d in zip(params, declared, strict=True):
        q["offset"], q["size"] = d.offset, d.size

    tv = triton_version()
    if target.backend == "cuda":
        tool = _ptxas_version()
        compiler_version = f"triton {tv}" + (f", ptxas {tool}" if tool else "")
    else:
        tool = _llvm_version(binary)
        compiler_version = f"triton {tv}" + (f", {tool}" if tool else "")
    entry = {
        "name": name,
        "target": target.name,
        "file": p["file"],
        "symbol": symbol,
        "params": params,
        "num_warps": md.num_warps,
        "threads_per_block": md.num_warps * target.warp_size,
        "shared": md.shared,
        "global_scratch_size": getattr(md, "global_scratch_size", 0) or 0,
        "global_scratch_align": getattr(md, "global_scratch_align", 1) or 1,
        "profile_scratch_size": getattr(md, "profile_scratch_size", 0) or 0,
        "profile_scratch_align": getattr(md, "profile_scratch_align", 1) or 1,
        "num_ctas": getattr(md, "num_ctas", 1),
        "launch_pdl": bool(getattr(md, "launch_pdl", False)),
        "launch_cooperative_grid": bool(getattr(md, "launch_cooperative_grid", False)),
        "config": p["config"],
        "constexprs": {k: _json_const(v, name) for k, v in consts.items()},
        "family": p["family"],
        "source": p["source"],
        "sha256": hashlib.sha256(binary).hexdigest(),
        "size": len(binary),
        "cache_key": p["key"],
        "compiler_version": compiler_version,
    }
    return entry, binary


def _init_worker(paths: list[str]) -> None:
    for pth in reversed(paths):
        if pth not in sys.path:
            sys.path.insert(0, pth)
