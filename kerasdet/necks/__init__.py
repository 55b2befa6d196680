"""kerasdet.necks: feature-pyramid necks that map backbone feature dicts to detector levels."""
from kerasdet.necks.fpn import FPN, upsample_nearest_to
from kerasdet.necks.refinedet import TransferConnectionBlocks

__all__ = ["FPN", "TransferConnectionBlocks", "upsample_nearest_to"]
