"""Config CSVs: schema, validation with file:line errors, the shipped untuned files, and the
DispatchTable built from tuned rows."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from vllm_moe_aot.dispatch import configs as C
from vllm_moe_aot.dispatch.configs import (
    KEY_COLUMNS,
    TUNED_COLUMNS,
    DispatchTable,
    RowKey,
    TunedRow,
    read_tuned,
    read_untuned,
    write_tuned,
)
from vllm_moe_aot.shapes import PRESETS, TUNED_TOKEN_COUNTS, MoEShape, Scheme

GPU, ARCH = "NVIDIA H100 80GB HBM3", "sm_90a"
HY3 = PRESETS["hy3"]
QWEN = PRESETS["qwen3.5-397b-a17b"]


def tuned_row(M: int, choice: str = "stock", shape: MoEShape = HY3.shape,
              scheme: Scheme = HY3.scheme, gpu: str = GPU, arch: str = ARCH) -> TunedRow:
    aot = choice != "stock"
    return TunedRow(
        key=RowKey.of(shape, scheme, M), gpu=gpu, arch=arch, cu_num=132,
        backend="aot" if aot else "stock", variant=choice if aot else "",
        us=10.0 + M, stock_us=20.0 + M, stock_provider="vllm_stock",
        speedup=(20.0 + M) / (10.0 + M), tflops=1.5, gbps=2000.0, err=1.2e-2,
        version="0.1.0", tuned_at="2026-11-25T12:00:00Z")


GOOD = ("1,4096,192,192,8,silu,fp8_per_tensor,1,H100,sm_90a,132,aot,gemv_a,10.0,25.0,"
        "vllm_stock,2.5,1.0,2000,1e-3,0.1.0,2026-11-25T00:00:00Z")


def _line(**changes) -> str:
    cells = dict(zip(TUNED_COLUMNS, GOOD.split(","), strict=True))
    cells.update({k: str(v) for k, v in changes.items()})
    return ",".join(cells[c] for c in TUNED_COLUMNS)


# ---------------------------------------------------------------- shipped untuned configs

def test_shipped_untuned_files_are_reproducible(tmp_path):
    written = C.generate_untuned(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["hy3_fp8_per_tensor_tp1_ep8.untuned.csv",
                     "hy3_fp8_per_tensor_tp8.untuned.csv",
                     "qwen3.5-397b-a17b-fp8_fp8_block_tp1_ep8.untuned.csv",
                     "qwen3.5-397b-a17b-fp8_fp8_block_tp8.untuned.csv",
                     "qwen3.5-397b-a17b_fp8_ptpc_tp1_ep8.untuned.csv",
                     "qwen3.5-397b-a17b_fp8_ptpc_tp8.untuned.csv"]
    for p in written:
        shipped = C.DEFAULT_CONFIG_DIR / p.name
        assert shipped.read_bytes() == p.read_bytes(), f"{shipped} differs from the generator"
    # the repo's top-level configs/ is the package folder
    top = Path(__file__).resolve().parents[1] / "configs"
    if top.exists():
        assert top.resolve() == C.DEFAULT_CONFIG_DIR.resolve()


@pytest.mark.parametrize("preset", [HY3, QWEN])
def test_shipped_untuned_content(preset):
    keys, issues = read_untuned(C.DEFAULT_CONFIG_DIR / C.untuned_name(preset))
    assert issues == []
    assert [k.tokens for k in keys] == list(TUNED_TOKEN_COUNTS)
    assert len(keys) == 18 and keys[0].tokens == 1 and keys[-1].tokens == 131072
    assert {k.shape for k in keys} == {preset.shape}
    assert {k.scheme for k in keys} == {preset.scheme.family}
    assert {k.activation for k in keys} == {"silu"}
    header = (C.DEFAULT_CONFIG_DIR / C.untuned_name(preset)).read_text().splitlines()[0]
    assert header.split(",") == list(KEY_COLUMNS)


def test_preset_shape_tp():
    assert C.preset_shape(QWEN, 8) == QWEN.shape
    assert C.preset_shape(QWEN, 4) == MoEShape(E=512, K=4096, N=256, topk=10)
    with pytest.raises(ValueError):
        C.preset_shape(HY3, 7)


# ---------------------------------------------------------------- schema, round trip

def test_tuned_roundtrip_and_column_order(tmp_path):
    rows = [tuned_row(1, "gemv_a"), tuned_row(8, "stock"),
            tuned_row(4, "gemv_b", gpu="AMD Instinct MI300X", arch="gfx942")]
    path = tmp_path / "x.tuned.csv"
    write_tuned(path, rows)
    assert path.read_text().splitlines()[0].split(",") == list(TUNED_COLUMNS)
    back, issues = read_tuned(path)
    assert issues == []
    assert {(r.gpu, r.key.tokens, r.choice) for r in back} == {
        (GPU, 1, "gemv_a"), (GPU, 8, "stock"), ("AMD Instinct MI300X", 4, "gemv_b")}
    r1 = next(r for r in back if r.key.tokens == 1)
    assert r1.us == pytest.approx(11.0) and r1.stock_us == pytest.approx(21.0)
    assert r1.err == pytest.approx(1.2e-2) and r1.cu_num == 132
    # an untuned reader takes the key columns of a tuned file
    keys, issues = read_untuned(path)
    assert issues == [] and len(keys) == 3


def test_optional_cells_may_be_empty(tmp_path):
    p = tmp_path / "t.tuned.csv"
    p.write_text(",".join(TUNED_COLUMNS) + "\n"
                 + _line(stock_us="", stock_provider="", speedup="", err="") + "\n")
    rows, issues = read_tuned(p)
    assert issues == []
    assert rows[0].stock_us is None and rows[0].speedup is None and rows[0].err is None


def test_malformed_rows_reported_with_file_and_line(tmp_path, caplog):
    p = tmp_path / "bad.tuned.csv"
    lines = [
        ",".join(TUNED_COLUMNS),                               # 1 header
        GOOD,                                                  # 2 ok
        "",                                                    # 3 blank: ignored
        _line(tokens="x"),                                     # 4
        GOOD.replace("1,", "2,", 1) + ",extra",                # 5 too many fields
        "4,4096,192,192,8,silu,fp8_per_tensor,H100,sm_90a",    # 6 too few
        _line(tokens=8, backend="cutlass"),                    # 7
        _line(tokens=16, variant=""),                          # 8 aot without variant
        _line(tokens=32, backend="stock"),                     # 9 stock with a variant
        _line(tokens=64, us="-3"),                             # 10
        _line(tokens=128, scheme="int8"),                      # 11
        _line(tokens=256, activation="gelu"),                  # 12
        _line(tokens=512, topk=300),                           # 13 topk > experts
        _line(tokens=1024, us="nan"),                          # 14
        _line(tokens=2048, stock_provider=""),                 # 15 stock_us without provider
        GOOD,                                                  # 16 duplicate of line 2
        _line(tokens=4096, gpu=""),                            # 17
        _line(tokens=8192),                                    # 18 ok
    ]
    p.write_text("\n".join(lines) + "\n")
    rows, issues = read_tuned(p)
    assert sorted(r.key.tokens for r in rows) == [1, 8192]
    by_line = {i.line: i.message for i in issues}
    assert sorted(by_line) == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    assert "tokens='x' is not an integer" in by_line[4]
    assert "too many fields" in by_line[5]
    assert "too few fields" in by_line[6]
    assert "backend='cutlass'" in by_line[7]
    assert "variant is empty" in by_line[8]
    assert "must be empty for backend=stock" in by_line[9]
    assert "us=-3.0 must be > 0" in by_line[10]
    assert "scheme='int8'" in by_line[11]
    assert "activation='gelu'" in by_line[12]
    assert "topk=300 exceeds experts" in by_line[13]
    assert "not finite" in by_line[14]
    assert "stock_provider is empty" in by_line[15]
    assert "duplicate of line 2" in by_line[16]
    assert "gpu is empty" in by_line[17]
    for i in issues:
        assert str(i).startswith(f"{p}:{i.line}: ")
    # the dispatch table loads the same file without raising and logs every issue
    with caplog.at_level(logging.WARNING, logger="vllm_moe_aot.dispatch.configs"):
        t = DispatchTable.for_layer(HY3.shape, HY3.scheme, "H100", "sm_90a", tmp_path)
    assert t.describe() == [(1, "gemv_a"), (8192, "gemv_a")]
    assert sum(f"{p}:" in r.getMessage() for r in caplog.records) == 14


def test_quoted_fields_and_crlf(tmp_path):
    p = tmp_path / "q.tuned.csv"
    p.write_bytes((",".join(TUNED_COLUMNS) + "\r\n" + _line(variant='"grouped:B=64,w4"')
                   + "\r\n" + _line(tokens="y") + "\r\n").encode())
    rows, issues = read_tuned(p)
    assert [r.variant for r in rows] == ["grouped:B=64,w4"]
    assert [(i.line, "tokens='y'" in i.message) for i in issues] == [(3, True)]


@pytest.mark.parametrize("content, message", [
    ("", "empty file"),
    ("tokens,model_dim,inter_dim\n1,2,3\n", "header lacks column(s) experts, topk"),
    ("tokens,tokens,model_dim,inter_dim,experts,topk,activation,scheme\n", "duplicate column"),
])
def test_unusable_files_never_raise(tmp_path, content, message):
    p = tmp_path / "h.untuned.csv"
    p.write_text(content)
    keys, issues = read_untuned(p)
    assert keys == []
    assert len(issues) == 1 and issues[0].line == 1 and message in issues[0].message
    missing = read_untuned(tmp_path / "nope.csv")
    assert missing[0] == [] and "cannot read" in missing[1][0].message


def test_column_order_warned_but_read(tmp_path):
    p = tmp_path / "o.untuned.csv"
    cols = list(KEY_COLUMNS)
    cols[0], cols[1] = cols[1], cols[0]
    p.write_text(",".join(cols) + "\n4096,2,192,192,8,silu,fp8_per_tensor,1\n")
    keys, issues = read_untuned(p)
    assert [k.tokens for k in keys] == [2]
    assert len(issues) == 1 and "canonical order" in issues[0].message


def test_untuned_duplicates_and_bad_values(tmp_path):
    p = tmp_path / "u.untuned.csv"
    p.write_text(",".join(KEY_COLUMNS) + "\n"
                 "1,4096,192,192,8,silu,fp8_per_tensor,1\n"
                 "1,4096,192,192,8,silu,fp8_per_tensor,1\n"
                 "0,4096,192,192,8,silu,fp8_per_tensor,1\n"
                 "2,4096,192,192,8,silu,fp8_ptpc,1\n")
    keys, issues = read_untuned(p)
    assert [k.tokens for k in keys] == [1, 2]
    assert [(i.line, i.message.split(" ")[0]) for i in issues] == [(3, "duplicate"),
                                                                   (4, "tokens=0")]


# ---------------------------------------------------------------- dispatch table

def _write_table(tmp_path: Path) -> Path:
    rows = [tuned_row(1, "gemv_1"), tuned_row(2, "gemv_2"), tuned_row(4, "stock"),
            tuned_row(8, "grouped_8"), tuned_row(128, "grouped_128"),
            # rows that must not match
            tuned_row(16, "other_gpu", gpu="NVIDIA H200"),
            tuned_row(16, "other_arch", arch="gfx942"),
            tuned_row(16, "other_shape", shape=MoEShape(192, 4096, 384, 8)),
            tuned_row(16, "other_scheme", scheme=Scheme.FP8_PTPC)]
    path = tmp_path / "hy3_fp8_per_tensor_tp8.tuned.csv"
    write_tuned(path, rows)
    return path


def test_dispatch_choices_at_bucket_edges(tmp_path):
    _write_table(tmp_path)
    t = DispatchTable.for_layer(HY3.shape, HY3.scheme, GPU, ARCH, tmp_path)
    assert not t.is_empty
    assert t.describe() == [(1, "gemv_1"), (2, "gemv_2"), (4, "stock"), (8, "grouped_8"),
                            (128, "grouped_128")]
    expect = {0: "gemv_1", 1: "gemv_1", 2: "gemv_2", 3: "stock", 4: "stock", 5: "grouped_8",
              8: "grouped_8", 9: "grouped_128", 127: "grouped_128", 128: "grouped_128",
              129: "grouped_128", 1 << 20: "grouped_128"}
    assert {m: t.choose(m) for m in expect} == expect
    # the dynamic per-tensor scheme shares the family's rows
    t2 = DispatchTable.for_layer(HY3.shape, Scheme.FP8_PER_TENSOR_DYNAMIC, GPU, ARCH, tmp_path)
    assert t2.describe() == t.describe()


def test_dispatch_matching_filters(tmp_path):
    _write_table(tmp_path)
    for kwargs, want in [
        (dict(gpu_name="NVIDIA H200"), [(16, "other_gpu")]),
        (dict(arch="gfx942"), [(16, "other_arch")]),
        (dict(shape=MoEShape(192, 4096, 384, 8)), [(16, "other_shape")]),
        (dict(scheme=Scheme.FP8_PTPC), [(16, "other_scheme")]),
    ]:
        args = dict(shape=HY3.shape, scheme=HY3.scheme, gpu_name=GPU, arch=ARCH)
        args.update(kwargs)
        assert DispatchTable.for_layer(config_dir=tmp_path, **args).describe() == want


def test_dispatch_empty_is_stock(tmp_path):
    unshipped = MoEShape(E=64, K=1024, N=64, topk=4)  # no shipped rows, no policy asked
    t = DispatchTable.for_layer(unshipped, QWEN.scheme, GPU, ARCH, tmp_path,
                                default_policy=False)
    assert t.is_empty and t.describe() == [] and t.origin == "none"
    assert t.choose(1) == "stock" and t.choose(100000) == "stock"
    # a missing folder behaves the same
    assert DispatchTable.for_layer(unshipped, QWEN.scheme, GPU, ARCH,
                                   tmp_path / "missing", default_policy=False).is_empty


def test_user_folder_adds_to_the_shipped_configs(tmp_path):
    # the user's folder has rows for Hy3 only: Hy3 dispatches from them, Qwen3.5 (no user rows)
    # still from the shipped rows for this GPU, before any default policy
    write_tuned(tmp_path / "mine.tuned.csv", [tuned_row(1, "gemv_user")])
    hy3 = DispatchTable.for_layer(HY3.shape, HY3.scheme, GPU, ARCH, tmp_path)
    assert hy3.describe() == [(1, "gemv_user")] and str(tmp_path) in hy3.source
    shipped = DispatchTable.for_layer(QWEN.shape, QWEN.scheme, GPU, ARCH)
    qwen = DispatchTable.for_layer(QWEN.shape, QWEN.scheme, GPU, ARCH, tmp_path)
    assert qwen.origin == "tuned" and qwen.describe() == shipped.describe()
    assert str(C.DEFAULT_CONFIG_DIR) in qwen.source and not shipped.is_empty


def test_dispatch_first_file_wins_and_reload_on_change(tmp_path):
    write_tuned(tmp_path / "a.tuned.csv", [tuned_row(4, "from_a")])
    write_tuned(tmp_path / "b.tuned.csv", [tuned_row(4, "from_b"), tuned_row(8, "b8")])
    t = DispatchTable.for_layer(HY3.shape, HY3.scheme, GPU, ARCH, tmp_path)
    assert t.describe() == [(4, "from_a"), (8, "b8")]
    path = tmp_path / "a.tuned.csv"
    write_tuned(path, [tuned_row(4, "changed"), tuned_row(2, "two")])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    t = DispatchTable.for_layer(HY3.shape, HY3.scheme, GPU, ARCH, tmp_path)
    assert t.describe() == [(2, "two"), (4, "changed"), (8, "b8")]


def test_shipped_dir_without_tuned_rows_is_fine():
    t = DispatchTable.for_layer(HY3.shape, HY3.scheme, "no such gpu", ARCH,
                                default_policy=False)
    assert t.is_empty and t.choose(7) == "stock"
