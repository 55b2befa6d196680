"""RefineDet transfer connection blocks (Zhang et al., "Single-Shot Refinement Neural Network for
Object Detection", CVPR 2018, sec. 3 "Transfer Connection Block" and Fig. 2).

The TCBs turn the anchor refinement module's (ARM) feature maps into the object detection module's
(ODM) maps, top-down: each higher ODM level is enlarged by a deconvolution, summed element-wise with
the transferred lower level for large-scale context, and a convolution follows the sum. For ARM maps
x_1..x_L (shallowest first; L = top) with ``channels`` = 256:
    top level:    t = relu(conv3x3(relu(conv3x3(x_L))));            P_L = relu(conv3x3(t))
    other levels: t = conv3x3(relu(conv3x3(x_k)))   (no ReLU)
                  u = deconv 2x2/2 (P_{k+1})         (no ReLU), cropped to t's size
                  P_k = relu(conv3x3(relu(t + u)))
This is the layer sequence of the authors' reference model (layers TL{k}_1, TL{k}_2, P{k+1}-up,
Elt{k}, P{k}), whose names the layers here follow in lower case ("tl6_1", "p6_up", "p5", ...).
The 2x2/2 deconvolution doubles the size; cropping covers maps whose size was rounded up by a
stride-2 layer below (odd sizes), so any input size works as long as each level is at most twice
the one above.
"""
import keras
import tensorflow as tf

from kerasdet.layers.winograd import WinogradConv2D


@keras.saving.register_keras_serializable(package="kerasdet")
class TransferConnectionBlocks(keras.layers.Layer):
    """RefineDet TCBs: dict of ARM maps -> dict of ODM maps {"P<k>"}.

    Args:
        input_names: names of the ARM maps in the input dict, shallowest first, e.g.
            ("conv4_3", "conv5_3", "fc7", "conv6_2") for VGG-16.
        output_names: names of the outputs, same order; default "P3".."P<2 + L>" as in the paper.
        channels: channels of every block (256 in the paper).
    """

    def __init__(self, input_names, output_names=None, channels=256, **kwargs):
        super().__init__(**kwargs)
        input_names = tuple(input_names)
        if not input_names or not all(isinstance(n, str) for n in input_names):
            raise ValueError(f"TransferConnectionBlocks: `input_names` must be a non-empty list of names, "
                             f"got {input_names!r}")
        output_names = tuple(output_names) if output_names is not None else tuple(
            f"P{3 + i}" for i in range(len(input_names)))
        if len(output_names) != len(input_names):
            raise ValueError(f"TransferConnectionBlocks: {len(output_names)} output_names for "
                             f"{len(input_names)} input_names")
        if int(channels) != channels or channels < 1:
            raise ValueError(f"TransferConnectionBlocks: `channels` must be a positive integer, got {channels!r}")
        self.input_names = input_names
        self.output_names = output_names
        self.channels = int(channels)

        def conv(name, relu):
            return WinogradConv2D(self.channels, 3, padding="same", activation="relu" if relu else None,
                                  dtype=self.dtype_policy, name=name)

        top = len(input_names) - 1
        self.first_convs, self.second_convs, self.output_convs, self.upsamplers = [], [], [], []
        for i, out in enumerate(output_names):
            tag = out.lower()
            self.first_convs.append(conv(f"tl{tag[1:]}_1" if tag[:1] == "p" else f"{tag}_tl1", True))
            self.second_convs.append(conv(f"tl{tag[1:]}_2" if tag[:1] == "p" else f"{tag}_tl2", i == top))
            self.output_convs.append(conv(tag, True))
            if i < top:
                above = output_names[i + 1].lower()
                self.upsamplers.append(keras.layers.Conv2DTranspose(
                    self.channels, 2, strides=2, padding="valid", dtype=self.dtype_policy, name=f"{above}_up"))

    def _check_inputs(self, features, shapes_given=False):
        if not isinstance(features, dict):
            raise TypeError(f"TransferConnectionBlocks: expects a dict of feature maps {self.input_names}, "
                            f"got {type(features).__name__}")
        missing = [n for n in self.input_names if n not in features]
        if missing:
            raise ValueError(f"TransferConnectionBlocks: input dict lacks {missing}; it has {sorted(features)}")
        for n in self.input_names:
            shape = tuple(features[n]) if shapes_given else tuple(features[n].shape)
            if len(shape) != 4:
                raise ValueError(f"TransferConnectionBlocks: feature {n!r} must be rank 4 [B, H, W, C], "
                                 f"got shape {shape}")

    def build(self, input_shape):
        self._check_inputs(input_shape, shapes_given=True)
        block_shape = (None, None, None, self.channels)
        for i, name in enumerate(self.input_names):
            self.first_convs[i].build(input_shape[name])
            self.second_convs[i].build(block_shape)
            self.output_convs[i].build(block_shape)
        for upsampler in self.upsamplers:
            upsampler.build(block_shape)
        self.built = True

    def call(self, features, training=None):
        self._check_inputs(features)
        top = len(self.input_names) - 1
        outputs = [None] * len(self.input_names)
        for i in range(top, -1, -1):
            t = self.second_convs[i](self.first_convs[i](features[self.input_names[i]], training=training),
                                    training=training)
            if i < top:
                up = self.upsamplers[i](outputs[i + 1])
                size = tf.shape(t)
                t = tf.nn.relu(t + up[:, :size[1], :size[2], :])
            outputs[i] = self.output_convs[i](t, training=training)
        return dict(zip(self.output_names, outputs))

    def compute_output_shape(self, input_shape):
        return {out: tuple(input_shape[name])[:3] + (self.channels,)
                for name, out in zip(self.input_names, self.output_names)}

    def get_config(self):
        config = super().get_config()
        config.update({"input_names": list(self.input_names), "output_names": list(self.output_names),
                       "channels": self.channels})
        return config
