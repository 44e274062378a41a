"""What every loaded kernel looks like to the pipeline, whatever launches it."""

from __future__ import annotations

from typing import Any

from vllm_moe_aot.runtime.errors import LaunchArgumentError
from vllm_moe_aot.runtime.manifest import ObjectEntry
from vllm_moe_aot.runtime.params import ParamPack


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
