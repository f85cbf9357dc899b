"""Parity checks for your own test suite (pytest or plain asserts).

    from slm_export.testing import assert_parity

    def test_export_matches_pytorch(model):
        assert_parity("exports/my-int4", model)        # raises AssertionError with the report

The same metrics and tolerances as `slm-export verify` (see docs/parity.md), unless you pass your own.
"""
from __future__ import annotations

from .verify import ParityReport, Tolerance


def assert_parity(artifact, reference=None, *, prompt_tokens: int = 64, decode_steps: int = 16,
                  perplexity: bool = False, tolerances: dict[str, Tolerance] | None = None) -> ParityReport:
    """Fail (AssertionError) when `artifact` drifts from `reference` beyond tolerance; return the report.

    artifact: a path (folder or bundle .zip) or an Artifact. reference: the PyTorch model (default:
    the source recorded in the artifact's manifest). tolerances: {"fp32": Tolerance, "same-quant": ...}
    to override the built-in bounds for this artifact's bit width.
    """
    from .artifact import Artifact

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    report = art.verify(reference=reference, prompt_tokens=prompt_tokens, decode_steps=decode_steps,
                        perplexity=perplexity, tolerances=tolerances)
    if not report.passed:
        raise AssertionError("parity over tolerance\n" + report.format())
    return report
