"""Silence third-party noise that is not actionable for a CPU user.

torchao logs that its optional CUDA kernels do not load, torch that some enums are deprecated, and
ExecuTorch that its Python API is experimental. They are loggers and warnings, so this must run
before the first import of those packages; errors still reach us as exceptions.
"""
from __future__ import annotations

import importlib
import logging
import warnings
from contextlib import contextmanager

LOGGERS = ("torchao", "executorch", "torch.utils._pytree", "torch._export", "torch.export", "coremltools")


def quiet_third_party() -> None:
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="This API is experimental")
    warnings.filterwarnings("ignore", module=r"(torchao|executorch|torch)\b.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


@contextmanager
def no_progress_bars(names):
    """Within this block, the tqdm each (module, attribute) in `names` calls by name draws nothing.

    Libraries draw a bar per tensor or pass where our log prints one line. tqdm reads TQDM_DISABLE
    only at import, too early for us to set it, so the names are swapped for a disabled tqdm instead.
    A name a library no longer has is skipped.
    """
    from functools import partial

    from tqdm import tqdm

    saved = []
    for module_name, attr in names:
        module = importlib.import_module(module_name)
        if hasattr(module, attr):
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, partial(tqdm, disable=True))
    try:
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)
