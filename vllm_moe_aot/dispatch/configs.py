"""Tuned and untuned config CSVs, their validation, and the per-layer :class:`DispatchTable`.

File names: ``configs/<model>_<scheme family>_tp<T>.untuned.csv`` (what to tune) and
``configs/<model>_<scheme family>_tp<T>.tuned.csv`` (what the tuner measured). Columns, in this
order (untuned files hold the key columns only)::

    tokens, model_dim, inter_dim, experts, topk, activation, scheme, ep,      <- key
    gpu, arch, cu_num, backend, variant, us, stock_us, stock_provider,
    speedup, tflops, gbps, err, version, tuned_at

``model_dim`` is K, ``inter_dim`` N (per TP partition), ``experts`` E (per rank); ``ep`` the
expert-parallel ranks (1: no EP; a file without the column is read as 1); ``scheme`` the family
name (``fp8_ptpc`` | ``fp8_per_tensor``); ``backend`` is ``aot`` (``variant`` names the pipeline
variant) or ``stock`` (``variant`` empty); ``us`` is the winner's whole-layer time, ``stock_us``
the stock path's in the same run (empty when no stock provider ran) and ``stock_provider`` who
measured it; ``err`` the winner's relative Frobenius error against the float64 reference.

Reading never raises on bad content: every malformed row is reported as ``file:line: message``
(1-based physical line, the header is line 1), logged once, and skipped.
"""

from __future__ import annotations

import bisect
import csv
import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from vllm_moe_aot.shapes import PRESETS, TUNED_TOKEN_COUNTS, MoEShape, Preset, Scheme

logger = logging.getLogger("vllm_moe_aot.dispatch.configs")

#: The package's config folder (the repo's top-level ``configs/`` is a symlink to it).
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

KEY_COLUMNS: tuple[str, ...] = (
    "tokens", "model_dim", "inter_dim", "experts", "topk", "activation", "scheme", "ep",
)
#: key columns a file may leave out, with the value they then have
OPTIONAL_KEY_COLUMNS: dict[str, str] = {"ep": "1"}
REQUIRED_KEY_COLUMNS: tuple[str, ...] = tuple(c for c in KEY_COLUMNS
                                              if c not in OPTIONAL_KEY_COLUMNS)
RESULT_COLUMNS: tuple[str, ...] = (
    "gpu", "arch", "cu_num", "backend", "variant", "us", "stock_us", "stock_provider",
    "speedup", "tflops", "gbps", "err", "version", "tuned_at",
)
TUNED_COLUMNS: tuple[str, ...] = KEY_COLUMNS + RESULT_COLUMNS
UNTUNED_COLUMNS: tuple[str, ...] = KEY_COLUMNS

ACTIVATIONS = ("silu",)
SCHEME_FAMILIES = ("fp8_ptpc", "fp8_per_tensor", "fp8_block")
BACKENDS = ("aot", "stock")
#: what :meth:`DispatchTable.choose` returns for the stock path
from vllm_moe_aot.contract import STOCK  # noqa: E402  (re-exported)


class ConfigError(Exception):
    """A config file that cannot be used at all (missing, unreadable, wrong header)."""


@dataclass(frozen=True)
class ConfigIssue:
    """One malformed row (or header) of one file."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True, order=True)
class RowKey:
    """The key columns of a row: one layer shape + scheme family at ``tokens`` tokens."""

    tokens: int
    model_dim: int
    inter_dim: int
    experts: int
    topk: int
    activation: str
    scheme: str
    ep: int = 1

    @property
    def shape(self) -> MoEShape:
        return MoEShape(E=self.experts, K=self.model_dim, N=self.inter_dim, topk=self.topk,
                        ep=self.ep)

    @property
    def M(self) -> int:
        return self.tokens

    def layer(self) -> tuple:
        """Everything but ``tokens``: rows sharing it form one dispatch table."""
        return (self.model_dim, self.inter_dim, self.experts, self.topk, self.activation,
                self.scheme, self.ep)

    @classmethod
    def of(cls, shape: MoEShape, scheme: Scheme | str, tokens: int,
           activation: str = "silu") -> RowKey:
        return cls(int(tokens), shape.K, shape.N, shape.E, shape.topk, activation,
                   scheme_family(scheme), shape.ep)

    def __str__(self) -> str:
        return f"M={self.tokens} {self.shape} {self.scheme} {self.activation}"


@dataclass(frozen=True)
class TunedRow:
    """One row of a tuned CSV. Optional numbers are None when the cell is empty."""

    key: RowKey
    gpu: str
    arch: str
    cu_num: int
    backend: str
    variant: str
    us: float
    stock_us: float | None
    stock_provider: str
    speedup: float | None
    tflops: float | None
    gbps: float | None
    err: float | None
    version: str
    tuned_at: str

    @property
    def choice(self) -> str:
        """What the dispatch table runs for this row: ``"stock"`` or the variant name."""
        return STOCK if self.backend == "stock" else self.variant

    def device_key(self) -> tuple[str, str]:
        return (self.gpu, self.arch)

    def to_record(self) -> dict[str, str]:
        rec = _key_record(self.key)
        rec.update(
            gpu=self.gpu, arch=self.arch, cu_num=str(self.cu_num), backend=self.backend,
            variant=self.variant, us=_fmt(self.us, ".3f"), stock_us=_fmt(self.stock_us, ".3f"),
            stock_provider=self.stock_provider, speedup=_fmt(self.speedup, ".4f"),
            tflops=_fmt(self.tflops, ".3f"), gbps=_fmt(self.gbps, ".2f"),
            err=_fmt(self.err, ".3e"), version=self.version, tuned_at=self.tuned_at)
        return rec


def scheme_family(scheme: Scheme | str) -> str:
    """``fp8_ptpc``, ``fp8_per_tensor`` or ``fp8_block`` for a :class:`Scheme` or any name it
    parses."""
    if isinstance(scheme, Scheme):
        return scheme.family
    if scheme in SCHEME_FAMILIES:
        return scheme
    return Scheme.parse(scheme).family


def scheme_of_family(family: str) -> Scheme:
    """The scheme a config family is tuned with (``fp8_per_tensor`` means static)."""
    return Scheme.parse(family)


def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        return ""
    return format(v, spec)


def _key_record(key: RowKey) -> dict[str, str]:
    return {f.name: str(getattr(key, f.name)) for f in fields(RowKey)}


# ----------------------------------------------------------------------------------- reading

def _physical_lines(text: str) -> list[int]:
    """1-based starting line of every CSV record after the header (csv module's view)."""
    starts: list[int] = []
    reader = csv.reader(text.splitlines(keepends=True))
    prev_end = 0
    for i, _ in enumerate(reader):
        if i > 0:
            starts.append(prev_end + 1)
        prev_end = reader.line_num
    return starts


class _RowErrors(Exception):
    pass


def _cell(rec: dict, col: str) -> str:
    v = rec.get(col)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v).strip()


def _int(rec: dict, col: str, minimum: int = 1) -> int:
    s = _cell(rec, col)
    try:
        v = int(s)
    except ValueError:
        raise _RowErrors(f"{col}={s!r} is not an integer") from None
    if v < minimum:
        raise _RowErrors(f"{col}={v} must be >= {minimum}")
    return v


def _float(rec: dict, col: str, *, optional: bool = False, positive: bool = True) -> float | None:
    s = _cell(rec, col)
    if s == "":
        if optional:
            return None
        raise _RowErrors(f"{col} is empty")
    try:
        v = float(s)
    except ValueError:
        raise _RowErrors(f"{col}={s!r} is not a number") from None
    if not math.isfinite(v):
        raise _RowErrors(f"{col}={s!r} is not finite")
    if positive and v <= 0:
        raise _RowErrors(f"{col}={v} must be > 0")
    if v < 0:
        raise _RowErrors(f"{col}={v} must be >= 0")
    return v


def _text(rec: dict, col: str) -> str:
    s = _cell(rec, col)
    if not s:
        raise _RowErrors(f"{col} is empty")
    return s


def _parse_key(rec: dict) -> RowKey:
    act = _text(rec, "activation")
    if act not in ACTIVATIONS:
        raise _RowErrors(f"activation={act!r} is not supported (only {', '.join(ACTIVATIONS)})")
    scheme = _text(rec, "scheme")
    if scheme not in SCHEME_FAMILIES:
        raise _RowErrors(f"scheme={scheme!r} must be one of {', '.join(SCHEME_FAMILIES)}")
    key = RowKey(
        tokens=_int(rec, "tokens"), model_dim=_int(rec, "model_dim"),
        inter_dim=_int(rec, "inter_dim"), experts=_int(rec, "experts"),
        topk=_int(rec, "topk"), activation=act, scheme=scheme,
        ep=_int(rec, "ep") if _cell(rec, "ep") else 1)
    if key.topk > key.experts * key.ep:
        raise _RowErrors(f"topk={key.topk} exceeds experts={key.experts * key.ep}")
    return key


def _parse_tuned(rec: dict) -> TunedRow:
    key = _parse_key(rec)
    backend = _text(rec, "backend")
    if backend not in BACKENDS:
        raise _RowErrors(f"backend={backend!r} must be one of {', '.join(BACKENDS)}")
    variant = _cell(rec, "variant")
    if backend == "aot" and not variant:
        raise _RowErrors("variant is empty for backend=aot")
    if backend == "stock" and variant:
        raise _RowErrors(f"variant={variant!r} must be empty for backend=stock")
    stock_us = _float(rec, "stock_us", optional=True)
    provider = _cell(rec, "stock_provider")
    if stock_us is not None and not provider:
        raise _RowErrors("stock_provider is empty but stock_us is set")
    if backend == "stock" and stock_us is None:
        raise _RowErrors("stock_us is empty for backend=stock")
    return TunedRow(
        key=key, gpu=_text(rec, "gpu"), arch=_text(rec, "arch"),
        cu_num=_int(rec, "cu_num"), backend=backend, variant=variant,
        us=_float(rec, "us"), stock_us=stock_us, stock_provider=provider,
        speedup=_float(rec, "speedup", optional=True),
        tflops=_float(rec, "tflops", optional=True, positive=False),
        gbps=_float(rec, "gbps", optional=True, positive=False),
        err=_float(rec, "err", optional=True, positive=False),
        version=_text(rec, "version"), tuned_at=_text(rec, "tuned_at"))


def _read_frame(path: Path, required: Sequence[str], canonical: Sequence[str],
                issues: list[ConfigIssue]) -> tuple[pd.DataFrame | None, list[int]]:
    """Read ``path`` with pandas, keeping row <-> physical line correspondence.

    Returns the frame (all cells strings, a row that had too many fields is all-NaN with
    ``__bad__`` set) and the 1-based line of each row; None when the file cannot be used.
    """
    spath = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(ConfigIssue(spath, 0, f"cannot read: {exc}"))
        return None, []
    if not text.strip():
        issues.append(ConfigIssue(spath, 1, "empty file (no header)"))
        return None, []
    header = next(csv.reader([text.splitlines()[0]]))
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        issues.append(ConfigIssue(spath, 1, f"header lacks column(s) {', '.join(missing)}; "
                                            f"expected {','.join(canonical)}"))
        return None, []
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        issues.append(ConfigIssue(spath, 1, f"duplicate column(s) {', '.join(dup)}"))
        return None, []
    if tuple(header[: len(canonical)]) != tuple(canonical) and set(canonical) <= set(header):
        issues.append(ConfigIssue(spath, 1, "columns are not in the canonical order "
                                            f"{','.join(canonical)} (read by name)"))
    ncols = len(header)
    too_many: list[list[str]] = []

    def bad_line(fields_: list[str]) -> list[str]:
        # keep the row (as a marker) so that row i stays physical record i
        too_many.append(fields_)
        return ["\x00__bad__"] + [""] * (ncols - 1)

    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False,
                         skip_blank_lines=False, engine="python", on_bad_lines=bad_line,
                         skipinitialspace=True)
    except Exception as exc:  # pandas.errors.ParserError and friends
        issues.append(ConfigIssue(spath, 1, f"cannot parse CSV: {exc}"))
        return None, []
    df.columns = [str(c).strip() for c in df.columns]
    starts = _physical_lines(text)
    if len(starts) != len(df):  # should not happen; fall back to "one record per line"
        starts = [i + 2 for i in range(len(df))]
    return df, starts


def _iter_records(path: Path, required: Sequence[str], canonical: Sequence[str],
                  issues: list[ConfigIssue]) -> Iterable[tuple[int, dict]]:
    df, lines = _read_frame(path, required, canonical, issues)
    if df is None:
        return
    spath = str(path)
    ncols = len(df.columns)
    for line, rec in zip(lines, df.to_dict("records"), strict=True):
        values = list(rec.values())
        first = values[0] if values else ""
        if isinstance(first, str) and first.startswith("\x00__bad__"):
            issues.append(ConfigIssue(spath, line, f"too many fields (expected {ncols})"))
            continue
        present = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
        if not any(str(v).strip() for v in present):
            continue  # blank line
        if len(present) < ncols:
            issues.append(ConfigIssue(spath, line, f"too few fields: {len(present)} of "
                                                   f"{ncols}"))
            continue
        yield line, rec


def read_untuned(path: str | os.PathLike) -> tuple[list[RowKey], list[ConfigIssue]]:
    """Keys of an untuned CSV (a tuned CSV works too: its key columns are read).

    Duplicate keys are reported and skipped.
    """
    path = Path(path)
    issues: list[ConfigIssue] = []
    keys: list[RowKey] = []
    seen: dict[RowKey, int] = {}
    for line, rec in _iter_records(path, REQUIRED_KEY_COLUMNS, UNTUNED_COLUMNS, issues):
        try:
            key = _parse_key(rec)
        except _RowErrors as exc:
            issues.append(ConfigIssue(str(path), line, str(exc)))
            continue
        if key in seen:
            issues.append(ConfigIssue(str(path), line, f"duplicate of line {seen[key]}"))
            continue
        seen[key] = line
        keys.append(key)
    return keys, issues


def read_tuned(path: str | os.PathLike) -> tuple[list[TunedRow], list[ConfigIssue]]:
    """Rows of a tuned CSV; a second row for the same (gpu, arch, key) is reported, skipped."""
    path = Path(path)
    issues: list[ConfigIssue] = []
    rows: list[TunedRow] = []
    seen: dict[tuple, int] = {}
    required = tuple(c for c in TUNED_COLUMNS if c not in OPTIONAL_KEY_COLUMNS)
    for line, rec in _iter_records(path, required, TUNED_COLUMNS, issues):
        try:
            row = _parse_tuned(rec)
        except _RowErrors as exc:
            issues.append(ConfigIssue(str(path), line, str(exc)))
            continue
        ident = (row.gpu, row.arch, row.key)
        if ident in seen:
            issues.append(ConfigIssue(str(path), line,
                                      f"duplicate of line {seen[ident]} (same gpu, arch, key)"))
            continue
        seen[ident] = line
        rows.append(row)
    return rows, issues


# ----------------------------------------------------------------------------------- writing

def _write_atomic(path: Path, header: Sequence[str], records: Iterable[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(header), lineterminator="\n")
        w.writeheader()
        for rec in records:
            w.writerow(rec)
    os.replace(tmp, path)


def sort_tuned(rows: Iterable[TunedRow]) -> list[TunedRow]:
    return sorted(rows, key=lambda r: (r.gpu, r.arch, r.key.layer(), r.key.tokens))


def write_tuned(path: str | os.PathLike, rows: Iterable[TunedRow]) -> None:
    """Write ``rows`` (sorted by gpu, arch, layer, tokens) atomically."""
    _write_atomic(Path(path), TUNED_COLUMNS, (r.to_record() for r in sort_tuned(rows)))


def write_untuned(path: str | os.PathLike, keys: Iterable[RowKey]) -> None:
    _write_atomic(Path(path), UNTUNED_COLUMNS, (_key_record(k) for k in keys))


# ---------------------------------------------------------------- shipped untuned configs

def preset_shape(preset: Preset, tp: int = 8, ep: int = 1) -> MoEShape:
    """The per-rank shape of ``preset`` at tensor parallelism ``tp`` (presets are given at 8),
    or with its experts spread over ``ep`` expert-parallel ranks.

    Without EP the experts are not sharded by TP, the intermediate size is. With EP (vLLM's
    ``--enable-expert-parallel``, ``ep = TP x DP`` ranks) each rank holds ``E / ep`` experts at
    the full intermediate size, so ``tp`` must divide ``ep`` and only decides the file name.
    """
    if tp < 1 or ep < 1:
        raise ValueError(f"tp and ep must be >= 1, got tp={tp}, ep={ep}")
    s = preset.shape
    full_n = s.N * 8
    if ep > 1:
        if ep % tp or s.E % ep:
            raise ValueError(f"{preset.name}: ep={ep} must be a multiple of tp={tp} and divide "
                             f"its {s.E} experts")
        return MoEShape(E=s.E // ep, K=s.K, N=full_n, topk=s.topk, ep=ep)
    if full_n % tp:
        raise ValueError(f"{preset.name}: intermediate size {full_n} is not divisible by tp={tp}")
    return MoEShape(E=s.E, K=s.K, N=full_n // tp, topk=s.topk)


def untuned_name(preset: Preset, tp: int = 8, ep: int = 1) -> str:
    return (f"{preset.name}_{preset.scheme.family}_tp{tp}" + (f"_ep{ep}" if ep > 1 else "")
            + ".untuned.csv")


def untuned_keys(preset: Preset, tp: int = 8, tokens: Sequence[int] = TUNED_TOKEN_COUNTS,
                 ep: int = 1) -> list[RowKey]:
    shape = preset_shape(preset, tp, ep)
    return [RowKey.of(shape, preset.scheme, m) for m in tokens]


#: the (tp, ep) layouts the shipped untuned CSVs cover: TP8, and vLLM's throughput recipe
#: ``-dp 8 --enable-expert-parallel`` (TP1 x DP8 = EP8)
SHIPPED_LAYOUTS: tuple[tuple[int, int], ...] = ((8, 1), (1, 8))


def generate_untuned(config_dir: str | os.PathLike | None = None, tp: int | None = None,
                     presets: Sequence[str] | None = None, ep: int = 1) -> list[Path]:
    """(Re)write the untuned CSVs: every preset at each shipped layout (or only at ``tp``
    and ``ep`` when ``tp`` is given), all tuned token counts."""
    out_dir = Path(config_dir) if config_dir is not None else DEFAULT_CONFIG_DIR
    layouts = SHIPPED_LAYOUTS if tp is None else ((tp, ep),)
    written = []
    for name in presets or list(PRESETS):
        preset = PRESETS[name]
        for t, e in layouts:
            path = out_dir / untuned_name(preset, t, e)
            write_untuned(path, untuned_keys(preset, t, ep=e))
            written.append(path)
    return written


# ------------------------------------------------------------------------------ dispatch

_FILE_CACHE: dict[str, tuple[tuple[int, int], list[TunedRow]]] = {}


def _load_tuned_cached(path: Path) -> list[TunedRow]:
    """Rows of one tuned file, re-read only when it changes; issues are logged once."""
    try:
        st = path.stat()
    except OSError:
        return []
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _FILE_CACHE.get(str(path))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    rows, issues = read_tuned(path)
    for issue in issues:
        logger.warning("vllm-moe-aot: skipping malformed config row: %s", issue)
    _FILE_CACHE[str(path)] = (stamp, rows)
    return rows


def gpu_family(name: str) -> str:
    """The GPU model a device name stands for, vendor and memory words dropped: ``NVIDIA H100
    80GB HBM3`` and ``NVIDIA H100 SXM5 80GB`` are both ``H100``; ``NVIDIA H200`` and ``NVIDIA
    H200 NVL`` are ``H200`` and ``H200 NVL`` (another power limit: tuned apart)."""
    words = [w for w in name.replace("-", " ").split()
             if w.upper() not in ("NVIDIA", "AMD", "INSTINCT", "TESLA")]
    keep = [w for w in words if not any(w.upper().endswith(s) for s in ("GB", "HBM3", "HBM3E",
                                                                        "SXM", "SXM5", "PCIE"))]
    return " ".join(keep).upper()


class DispatchTable:
    """Which implementation runs one layer at each batch size.

    ``choose(M)`` returns the choice of the entry with the smallest ``tokens >= M``, or of the
    largest entry beyond that; with no entries it returns ``"stock"``. ``origin`` says where
    the entries came from: ``tuned`` (rows for this GPU model), ``default`` (the measured
    default policy, :mod:`vllm_moe_aot.dispatch.policy`), ``other-gpu`` (rows tuned on another
    GPU of the same arch, used only where the policy has nothing) or ``none``.
    """

    def __init__(self, entries: Iterable[tuple[int, str]] = (), source: str = "",
                 origin: str = "tuned"):
        table: dict[int, str] = {}
        for m, choice in entries:
            table.setdefault(int(m), choice)
        self._tokens = sorted(table)
        self._choices = [table[m] for m in self._tokens]
        self.source = source
        self.origin = origin if self._tokens else "none"

    @classmethod
    def from_rows(cls, rows: Iterable[TunedRow], shape: MoEShape, scheme: Scheme | str,
                  gpu_name: str, arch: str, source: str = "") -> DispatchTable:
        """Rows for this GPU model (exact name first, then names of the same
        :func:`gpu_family`), this arch and this layer."""
        layer = RowKey.of(shape, scheme, 1).layer()
        mine = [r for r in rows if r.arch == arch and r.key.layer() == layer]
        exact = [(r.key.tokens, r.choice) for r in mine if r.gpu == gpu_name]
        family = [(r.key.tokens, r.choice) for r in mine
                  if r.gpu != gpu_name and gpu_family(r.gpu) == gpu_family(gpu_name)]
        return cls(exact + family, source)

    def restricted_to(self, available: Iterable[str]) -> DispatchTable:
        """The same table with every choice not in ``available`` replaced by stock."""
        ok = set(available)
        entries = [(m, c if c == STOCK or c in ok else STOCK) for m, c in self.describe()]
        return DispatchTable(entries, self.source, self.origin)

    @classmethod
    def for_layer(cls, shape: MoEShape, scheme: Scheme | str, gpu_name: str, arch: str,
                  config_dir: str | os.PathLike | None = None, *, sm_count: int | None = None,
                  default_policy: bool = True) -> DispatchTable:
        """Rows for this GPU model from every ``*.tuned.csv`` in ``config_dir`` (files in name
        order; the first row for a token count wins), else from the shipped configs (a user's
        folder adds to what ships, layer by layer); without any, the default policy; without
        that, rows tuned on another GPU of the same arch; else empty (stock everywhere)."""
        from vllm_moe_aot.dispatch.policy import default_dispatch

        cdir = Path(config_dir) if config_dir is not None else DEFAULT_CONFIG_DIR
        dirs = [cdir] + ([DEFAULT_CONFIG_DIR] if cdir.resolve() != DEFAULT_CONFIG_DIR.resolve()
                         else [])
        table = cls()
        table_rows: list[TunedRow] = []
        for d in dirs:
            files = sorted(d.glob("*.tuned.csv")) if d.is_dir() else []
            rows_here: list[TunedRow] = []
            used: list[str] = []
            for f in files:
                rows = _load_tuned_cached(f)
                rows_here.extend(rows)
                if any(gpu_family(r.gpu) == gpu_family(gpu_name) and r.arch == arch
                       for r in rows):
                    used.append(f.name)
            table_rows.extend(rows_here)
            if table.is_empty:
                table = cls.from_rows(rows_here, shape, scheme, gpu_name, arch,
                                      source=", ".join(str(d / u) for u in used))
        if not table.is_empty or not default_policy:
            return table
        decision = default_dispatch(shape, scheme, arch, sm_count)
        if decision.uses_aot:
            return cls(decision.entries, decision.reason, origin="default")
        layer = RowKey.of(shape, scheme, 1).layer()
        other = [(r.key.tokens, r.choice) for r in table_rows
                 if r.arch == arch and r.key.layer() == layer]
        if other:
            return cls(other, f"rows tuned on another {arch} GPU in {cdir}", origin="other-gpu")
        return cls((), decision.reason, origin="none")

    @property
    def is_empty(self) -> bool:
        return not self._tokens

    def choose(self, M: int) -> str:
        if not self._tokens:
            return STOCK
        i = bisect.bisect_left(self._tokens, M)
        return self._choices[min(i, len(self._choices) - 1)]

    def describe(self) -> list[tuple[int, str]]:
        return list(zip(self._tokens, self._choices, strict=True))

    def __repr__(self) -> str:
        return f"DispatchTable({self.describe()!r})"
