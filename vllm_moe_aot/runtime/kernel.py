"""What every loaded kernel looks like to the pipeline, whatever launches it."""

from __future__ import annotations

from typing import Any

from vllm_moe_aot.runtime.errors import LaunchArgumentError
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


class Kernel:
    """A loaded kernel. ``launch(grid, *args, pdl=False)`` enqueues it on the current stream.

    ``args`` are the spec's non-constexpr parameters in signature order; the parameters the
    compiler appended are filled by the launcher. An empty grid (any dimension 0) launches
    nothing, as Triton does.
    """

    name: str
    target: str
    entry: ObjectEntry
    params: ParamPack | None
    _max_programs: int | None = None

    def _init_params(self, entry: ObjectEntry) -> None:
        """The parameter buffer, packed once: a launch only overwrites the user's values."""
        self.params = ParamPack(entry.name, [p.name for p in entry.params],
                                [p.type for p in entry.params],
                                sum(p.appended for p in entry.params))
        self._write = self.params.write

    def _prepare(self, grid: Any, args: tuple) -> tuple[int, int, int] | None:
        """Write ``args`` into the parameter buffer and check ``grid``; None for an empty grid
        (nothing to launch). The same checks for every launcher."""
        try:
            self._write(*args)
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._arg_error(args, exc) from None
        gx, gy, gz = grid3(grid, self.name)
        try:
            if gx <= 0 or gy <= 0 or gz <= 0:
                if gx < 0 or gy < 0 or gz < 0:
                    raise bad_grid(grid, self.name)
                return None
        except TypeError:
            raise bad_grid(grid, self.name) from None
        if self._max_programs is not None and gx * gy * gz > self._max_programs:
            raise LaunchArgumentError(
                f"kernel {self.name!r}: grid {grid!r} has more programs than the "
                f"{self._max_programs} its scratch buffer was sized for (max_programs)")
        return gx, gy, gz

    def launch(self, grid: Any, *args: Any, pdl: bool = False) -> None:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name} target={self.target} "
                f"config={self.entry.config!r}>")

    def _arg_error(self, args: tuple, exc: Exception) -> LaunchArgumentError:
        if isinstance(exc, LaunchArgumentError):
            return exc
        pack = self.params
        if pack is not None and len(args) != pack.n_user:
            return pack.arity_error(len(args))
        return LaunchArgumentError(f"kernel {self.name!r}: bad launch arguments: {exc}")


class DeviceKernel(Kernel):
    """State shared by the GPU launchers' kernels: module, function, packed parameters with
    the appended scratch pointers, and the launch geometry read once from the manifest."""

    def __init__(self, launcher: Any, co: Any, module: Any, func: Any,
                 max_programs: int | None):
        e = co.entry
        self.name, self.target, self.entry, self.path = e.name, e.target, e, co.path
        self.launcher = launcher
        self.module, self.func = module, func
        self._init_params(e)
        self.scratch = Scratch.for_entry(e, max_programs, launcher._alloc, launcher.device_index)
        self.params.set_appended(scratch_values(e, self.scratch))
        self._addr = self.params.address
        self._threads = e.threads_per_block
        self._shared = e.shared
        self._stream = launcher._stream_fn
        self._ok = launcher.SUCCESS
        self._max_programs = self.scratch.max_programs if self.scratch else None
