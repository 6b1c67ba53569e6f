"""Lightning callbacks: prediction shards and overlays."""

from callbacks.heatmap_writer import HeatmapWriter, read_shards

__all__ = ["HeatmapWriter", "read_shards"]
