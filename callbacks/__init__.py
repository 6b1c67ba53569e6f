"""Lightning callbacks: prediction shards and overlays."""

from callbacks.heatmap_writer import HeatmapWriter, read_shards
from callbacks.timing import Timing

__all__ = ["HeatmapWriter", "Timing", "read_shards"]
