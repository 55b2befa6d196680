"""kerasdet.necks: feature-pyramid necks that map backbone feature dicts to detector levels."""
from kerasdet.necks.fpn import FPN, upsample_nearest_to

__all__ = ["FPN", "upsample_nearest_to"]
