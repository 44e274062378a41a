"""Triton kernel sources and the AOT build (not shipped at run time: code objects are)."""
