"""Plain functions on tensors: boxes, anchors, matching, sampling, mask resampling, and the custom
kernels.

Each module declares its public names in ``__all__``; they are all re-exported here so users write
``kerasdet.ops.box_iou`` or ``kerasdet.ops.roi_align``.
"""
from kerasdet.ops.boxes import *  # noqa: F401,F403
from kerasdet.ops.anchors import *  # noqa: F401,F403
from kerasdet.ops.matching import *  # noqa: F401,F403
from kerasdet.ops.sampling import *  # noqa: F401,F403
from kerasdet.ops.roi import *  # noqa: F401,F403
from kerasdet.ops.deform import *  # noqa: F401,F403
from kerasdet.ops.masks import *  # noqa: F401,F403
from kerasdet.ops.pointwise import *  # noqa: F401,F403
from kerasdet.ops.strided_conv import *  # noqa: F401,F403
from kerasdet.ops.winograd import *  # noqa: F401,F403
