"""Lightning callbacks: prediction shards and overlays, results, timing, W&B media, the variant record."""

from callbacks.heatmap_writer import HeatmapWriter, read_progress, read_shards
from callbacks.results_writer import ResultsWriter
from callbacks.timing import Timing
from callbacks.variant_record import VariantRecord
from callbacks.wandb_media import WandbMedia

__all__ = ["HeatmapWriter", "ResultsWriter", "Timing", "VariantRecord", "WandbMedia", "read_progress", "read_shards"]
