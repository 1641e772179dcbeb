"""Demo data ("shapes" task) and evaluation datasets."""

from .dataset import Dataset, Record, load_dataset, write_shapes

# The project's fixed data splits (spec v1). Training draws from seeds [recipe seed, step, rank];
# these seeds are used for nothing else.
HELDOUT = "shapes:2400:777"  # the held-out set every accuracy target is measured on (400 per type)
AGREEMENT = "shapes:200:778"  # the 200 questions runtimes must agree on
CALIBRATION_SEED = 555  # calibration data for quantization / sparsity / token-method tuning

__all__ = ["Dataset", "Record", "load_dataset", "write_shapes", "HELDOUT", "AGREEMENT", "CALIBRATION_SEED"]
