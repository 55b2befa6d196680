"""External proposals (Fast R-CNN's selective search, R-CNN-style inputs): a proposal source that
reads the boxes from the batch instead of predicting them."""
import tensorflow as tf

from kerasdet import ops

__all__ = ["ExternalProposals"]


class ExternalProposals:
    """The batch's `proposals` [B, P, 4] (zero-area rows are padding); no layers, no losses.
    Same interface as `kerasdet.heads.rpn.RPN`."""

    input_keys = ("proposals",)

    @staticmethod
    def read(inputs):
        if not isinstance(inputs, dict) or "proposals" not in inputs:
            raise ValueError("This detector works on external proposals: give it a dict with "
                             "`images` and `proposals` [B, P, 4] (zero-area rows are padding).")
        proposals = tf.cast(inputs["proposals"], tf.float32)
        return proposals, ops.valid_boxes_mask(proposals)

    def with_losses(self, maps, context, seed, training):
        return (*self.read(context["batch"]), {})

    def inference(self, maps, inputs, image_shapes):
        return self.read(inputs)

    @staticmethod
    def example_inputs(images):
        """What `build` runs the detector on: the images and one proposal."""
        return {"images": images, "proposals": tf.constant([[[0.0, 0.0, 32.0, 32.0]]])}
