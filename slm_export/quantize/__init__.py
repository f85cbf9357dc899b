"""One quantization spec for every target, and the per-weight report each exporter writes."""
from .report import QuantReport, WeightEntry
from .spec import QuantSpec, WeightPlan

__all__ = ["QuantSpec", "WeightPlan", "QuantReport", "WeightEntry"]
