"""What every loaded kernel looks like to the pipeline, whatever launches it, and what the
launchers share (argument binding, grid and scratch checks, status checking)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm_moe_aot.runtime.errors import DriverError, LaunchArgumentError
from vllm_moe_aot.runtime.manifest import ObjectEntry
from vllm_moe_aot.runtime.params import ParamPack
from vllm_moe_aot.runtime.scratch import Scratch, scratch_values


def grid3(grid: Any, kernel: str) -> tuple[int, int, int]:
    """``(x,)``, ``(x, y)``, ``(x, y, z)`` or an int -> three ints (missing ones are 1)."""
    if grid.__class__ is int:
        return grid, 1, 1
    try:
        n = len(grid)
    except TypeError:
        raise LaunchArgumentError(
            f"kernel {kernel!r}: grid must be an int or a tuple of 1 to 3 ints, got {grid!r}"
        ) from None
    if n == 3:
        return grid[0], grid[1], grid[2]
    if n == 1:
        return grid[0], 1, 1
    if n == 2:
        return grid[0], grid[1], 1
    raise LaunchArgumentError(f"kernel {kernel!r}: grid must have 1 to 3 dimensions, got {grid!r}")


def bad_grid(grid: Any, kernel: str) -> LaunchArgumentError:
    return LaunchArgumentError(
        f"kernel {kernel!r}: grid {grid!r} must hold non-negative ints (x < 2**31, y and z < 65536)"
    )


def torch_stream_fn(device_index: int) -> Callable[[], int]:
    """Cheapest way to read PyTorch's current stream handle for ``device_index``."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return lambda: raw(device_index)
    return lambda: torch.cuda.current_stream(device_index).cuda_stream


class Kernel:
    """A loaded kernel. ``launch(grid, *args, pdl=False, **named)`` enqueues it on the current
    stream.

    Arguments are bound to the manifest's parameter names (the artifact's order; positional
    ones in that order); the parameters the compiler appended are filled here. An empty grid
    (any dimension 0) launches nothing, as Triton does. Subclasses differ only in
    :meth:`_enqueue`, the driver call.
    """

    name: str
    target: str
    entry: ObjectEntry
    params: ParamPack | None
    path: Any = None
    scratch: Scratch | None = None
    _max_programs: int | None = None

    def _bind(self, entry: ObjectEntry, target: str, scratch: Scratch | None = None,
              path: Any = None) -> None:
        """What every launcher's kernel holds: the parameter buffer (appended parameters set
        from ``scratch``) and the scratch bound on programs."""
        self.name, self.target, self.entry, self.path = entry.name, target, entry, path
        self.params = ParamPack(entry.name, [p.name for p in entry.params],
                                [p.type for p in entry.params],
                                sum(p.appended for p in entry.params))
        self.scratch = scratch
        self.params.set_appended(scratch_values(entry, scratch))
        self._write = self.params.write
        self._max_programs = scratch.max_programs if scratch else None

    def launch(self, grid: Any, *args: Any, pdl: bool = False, **named: Any) -> None:
        try:
            self._write(*args, **named)
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._arg_error(args, exc, named) from None
        gx, gy, gz = grid3(grid, self.name)
        try:
            if gx <= 0 or gy <= 0 or gz <= 0:
                if gx < 0 or gy < 0 or gz < 0:
                    raise bad_grid(grid, self.name)
                return
        except TypeError:
            raise bad_grid(grid, self.name) from None
        if self._max_programs is not None and gx * gy * gz > self._max_programs:
            raise LaunchArgumentError(
                f"kernel {self.name!r}: grid {grid!r} has more programs than the "
                f"{self._max_programs} its scratch buffer was sized for (max_programs)")
        self._enqueue(gx, gy, gz, pdl, args, named)

    def _enqueue(self, gx: int, gy: int, gz: int, pdl: bool, args: tuple,
                 named: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name} target={self.target} "
                f"config={self.entry.config!r}>")

    def _arg_error(self, args: tuple, exc: Exception,
                   named: dict[str, Any] | None = None) -> LaunchArgumentError:
        if isinstance(exc, LaunchArgumentError):
            return exc
        pack = self.params
        if pack is not None:
            err = pack.binding_error(args, named or {})
            if err is not None:
                return err
        return LaunchArgumentError(f"kernel {self.name!r}: bad launch arguments: {exc}")


class DriverKernel(Kernel):
    """A kernel loaded through a GPU driver (CUDA, HIP): what both hold; subclasses add only
    their driver's launch call."""

    def __init__(self, launcher: DriverLauncher, co: Any, module: Any, func: Any,
                 max_programs: int | None):
        e = co.entry
        self._bind(e, e.target, launcher.scratch_for(e, max_programs), co.path)
        self.launcher = launcher
        self.module, self.func = module, func
        self._addr = self.params.address
        self._threads = e.threads_per_block
        self._shared = e.shared
        self._stream = launcher._stream_fn
        self._ok = launcher.SUCCESS


class DriverLauncher:
    """What the CUDA and HIP launchers share: the device, stream and scratch allocator, and
    status checking with messages that name the call, the kernel and what to do. Subclasses
    supply the driver calls (:meth:`status_name`, :meth:`status_text`, ``load``)."""

    #: driver status name -> what to do about it
    HINTS: dict[str, str] = {}
    #: how messages name the device ("CUDA", "HIP")
    DEVICE_KIND = "GPU"

    def __init__(self, device_index: int, driver: Any, success: Any,
                 stream_fn: Callable[[], int] | None = None,
                 alloc: Callable[[int], tuple[int, object]] | None = None):
        self.drv = driver
        self.device_index = device_index
        self._stream_fn = stream_fn or torch_stream_fn(device_index)
        self._alloc = alloc
        self.SUCCESS = success

    def status_name(self, status: Any) -> str:
        return getattr(status, "name", str(status))

    def status_text(self, status: Any) -> str:
        return ""

    def error(self, call: str, status: Any, kernel: str | None = None, where: str = "",
              ) -> DriverError:
        name = self.status_name(status)
        text = self.status_text(status)
        hint = self.HINTS.get(name, "")
        subject = (f"kernel {kernel!r}{where}" if kernel else
                   f"{self.DEVICE_KIND} device {self.device_index}")
        msg = f"{call} failed for {subject}: {name}" + (f" ({text})" if text else "")
        if hint:
            msg += f"; {hint}"
        return DriverError(msg, call=call, status=status, kernel=kernel)

    def check(self, call: str, result: Any, kernel: str | None = None, where: str = "") -> Any:
        status = result[0]
        if status != self.SUCCESS:
            raise self.error(call, status, kernel, where)
        return result[1] if len(result) == 2 else (result[1:] or None)

    def scratch_for(self, entry: ObjectEntry, max_programs: int | None) -> Scratch | None:
        return Scratch.for_entry(entry, max_programs, self._alloc, self.device_index)
