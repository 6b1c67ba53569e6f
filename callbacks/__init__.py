"""Lightning callbacks: prediction shards and overlays."""

from callbacks.heatmap_writer import HeatmapWriter, read_progress, read_shards
from callbacks.timing import Timing
from callbacks.variant_record import VariantRecord
from callbacks.wandb_media import WandbMedia

__all__ = ["HeatmapWriter", "Timing", "VariantRecord", "WandbMedia", "read_progress", "read_shards"]
