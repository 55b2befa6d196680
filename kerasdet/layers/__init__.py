"""Keras layers wrapping the ops of kerasdet.ops (each with get_config)."""
from kerasdet.layers.normalization import *  # noqa: F401,F403
from kerasdet.layers.roi_layers import *  # noqa: F401,F403
from kerasdet.layers.deform_layers import *  # noqa: F401,F403
from kerasdet.layers.spp import *  # noqa: F401,F403
from kerasdet.layers.pointwise import *  # noqa: F401,F403
from kerasdet.layers.winograd import *  # noqa: F401,F403
