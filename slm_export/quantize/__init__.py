"""One quantizer for every target: spec -> plan (against the target's limits) -> codes -> exporters pack them."""
from .codes import QuantizedWeight
from .limits import TargetLimits
from .plan import QuantPlan, WeightPlan
from .report import QuantReport, WeightEntry
from .spec import QuantSpec, WeightRequest

__all__ = ["QuantSpec", "WeightRequest", "TargetLimits", "QuantPlan", "WeightPlan", "QuantizedWeight",
           "QuantReport", "WeightEntry"]
