"""Silence third-party import-time noise that is not actionable for a CPU user.

torchao logs that its optional CUDA kernels do not load, torch that some enums are deprecated, and
ExecuTorch that its Python API is experimental. They are loggers and warnings, so this must run
before the first import of those packages; errors still reach us as exceptions.
"""
from __future__ import annotations

import logging
import warnings

LOGGERS = ("torchao", "executorch", "torch.utils._pytree", "torch._export", "torch.export", "coremltools")


def quiet_third_party() -> None:
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="This API is experimental")
    warnings.filterwarnings("ignore", module=r"(torchao|executorch|torch)\b.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
