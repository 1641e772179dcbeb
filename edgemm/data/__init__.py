"""Demo data ("shapes" task) and evaluation datasets."""

from .dataset import Dataset, Record, load_dataset, write_shapes

__all__ = ["Dataset", "Record", "load_dataset", "write_shapes"]
