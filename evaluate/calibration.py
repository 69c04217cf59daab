"""Temperature scaling lives in xray.train.calibration (xray-export fits it too); kept here for xray-eval."""
from xray.train.calibration import calibration_quality, fit_temperature  # noqa: F401
