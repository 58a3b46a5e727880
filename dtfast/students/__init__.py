"""Students: a timm CNN backbone (C2..C5) + the UPerNet-like regressor of DESIGN.md section 2."""

from .regressor import PyramidPooling, UPerRegressor
from .student import DistillStudent, build_student, check_feature_shapes

__all__ = ["DistillStudent", "PyramidPooling", "UPerRegressor", "build_student", "check_feature_shapes"]
