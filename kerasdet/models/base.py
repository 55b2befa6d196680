"""The training / inference plumbing every kerasdet detector shares.

A detector subclasses `Detector` and implements two methods on padded dense tensors:
    compute_detection_losses(batch, training) -> dict of scalar losses
    detect(images, image_shapes) -> predict dict (boxes, scores, classes, num_detections[, masks])
`Detector` turns them into Keras' train_step / test_step / predict_step, so that compile(), fit()
on a tf.data pipeline, evaluate() and predict() work as for any Keras model.
"""
import json

import keras
import tensorflow as tf

from kerasdet.layers.roi_layers import keep_input_dtypes

__all__ = ["Detector", "batch_image_shapes", "ground_truth", "ground_truth_crowd"]


def batch_image_shapes(batch, images):
    """[B, 2] valid (height, width) of each padded image.

    The pipeline's `image_info` holds them (see kerasdet.data.pipeline); without it (plain image
    tensors given to predict) the whole padded canvas counts as the image.
    """
    if isinstance(batch, dict) and "image_info" in batch:
        info = tf.cast(batch["image_info"], tf.float32)
        return info[:, 4:6]
    shape = tf.cast(tf.shape(images)[1:3], tf.float32)
    return tf.tile(shape[tf.newaxis], [tf.shape(images)[0], 1])


def ground_truth(batch):
    """(boxes [B, N, 4], labels [B, N]) padded with label -1, with N >= 1 so that gathers on
    "the matched ground truth" are valid even for a batch without any object."""
    boxes = tf.cast(batch["bounding_boxes"]["boxes"], tf.float32)
    labels = tf.cast(batch["bounding_boxes"]["labels"], tf.int32)
    batch_size = tf.shape(boxes)[0]
    boxes = tf.concat([boxes, tf.zeros([batch_size, 1, 4], boxes.dtype)], axis=1)
    labels = tf.concat([labels, -tf.ones([batch_size, 1], labels.dtype)], axis=1)
    return boxes, labels


def ground_truth_crowd(batch):
    """bool [B, N + 1], aligned with `ground_truth`: the batch's COCO ``iscrowd`` flags (crowd
    regions are ignored by the samplers, see kerasdet.ops.matching), all False when the batch has
    none, so data sets without crowd flags train as before."""
    labels = batch["bounding_boxes"]["labels"]
    crowd = batch["bounding_boxes"].get("iscrowd")
    crowd = tf.zeros(tf.shape(labels), tf.bool) if crowd is None else tf.cast(crowd, tf.bool)
    return tf.concat([crowd, tf.zeros([tf.shape(crowd)[0], 1], tf.bool)], axis=1)


def replicas_in_sync():
    """How many replicas share the current step (1 outside a tf.distribute strategy)."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: the strategy's own count
        return tf.distribute.get_strategy().num_replicas_in_sync
    return context.num_replicas_in_sync


class Detector(keras.Model):
    """Base class: Keras plumbing around `compute_detection_losses` and `detect`."""

    loss_names = ()
    # The batch entries predict uses; predict / predict_on_batch also take a plain image tensor.
    predict_input_keys = ("images", "image_info")

    def __init__(self, num_classes, class_names=None, input_settings=None, **kwargs):
        super().__init__(**kwargs)
        # The batch's float entries (image_info sizes, Fast R-CNN's proposals) reach the model
        # float32: Keras would otherwise cast them to a mixed policy's compute dtype when the model
        # is called (predict), and bfloat16 rounds an image width of 1333 to 1336. The images are
        # cast by `input_images`; every layer keeps its own autocasting.
        keep_input_dtypes(self)
        if int(num_classes) < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes!r}.")
        self.num_classes = int(num_classes)
        self.class_names = class_names
        self.input_settings = input_settings
        self._trackers = {name: keras.metrics.Mean(name=name)
                          for name in ("loss",) + tuple(self.loss_names)}

    # -- subclass interface ---------------------------------------------------------------------
    def compute_detection_losses(self, batch, training):
        raise NotImplementedError

    def detect(self, images, image_shapes, training=False):
        raise NotImplementedError

    # -- Keras plumbing -------------------------------------------------------------------------
    def build(self, input_shape=None):
        """Creates every weight by running one inference on a blank image.

        `input_shape` is (B, H, W, 3) with H, W possibly None (then 64). Subclassed detectors
        create their weights lazily on the first call, so this is what count_params(),
        load_weights() and summary() need first.
        """
        if self.built:
            return
        if isinstance(input_shape, dict):  # called on a batch dict
            input_shape = input_shape.get("images")
        shape = tuple(input_shape) if input_shape is not None else ()
        if len(shape) != 4:
            shape = (1, None, None, 3)
        height, width = shape[1] or 64, shape[2] or 64
        # The weights belong to the strategy the model was made under, even when fit() (which
        # builds first) is called outside its scope.
        with self.distribute_strategy.scope():
            self.call(tf.zeros([1, height, width, 3], self.compute_dtype), training=False)
        self.built = True

    def fit(self, *args, **kwargs):
        # Weights must exist before Keras creates the optimizer's slots for them.
        self.build()
        data = args[0] if args else kwargs.get("x")
        if isinstance(data, (tf.data.Dataset, tf.distribute.DistributedDataset)):
            # The pipeline shuffles its records itself; Keras' shuffle flag would only warn.
            kwargs.setdefault("shuffle", False)
        return super().fit(*args, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' version learns the input shapes under a strategy by averaging one whole batch over
        # the replicas (distribute_strategy.reduce("MEAN", batch)), which fails on the batch's bool
        # entries (`difficult`, `iscrowd`: no AddN for bool) and copies every image for nothing. A
        # detector builds its weights from a blank image (`build`), and the optimizer's slots only
        # need the weights, so both are made here, in the strategy's scope.
        with self.distribute_strategy.scope():
            self.build()
            if self.optimizer is not None and not self.optimizer.built:
                self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        return list(self._trackers.values())

    @staticmethod
    def _unpack(data):
        if isinstance(data, tuple):  # (x,) or (x, y) from a dataset that splits them
            data = data[0]
        return data

    def compile(self, *args, jit_compile="auto", **kwargs):
        """Keras' compile, with XLA chosen for what the detector's layers can compile.

        The compiled kernels (kerasdet.ops.roi, kerasdet.ops.deform) have no XLA implementation,
        so a layer that calls them reports ``supports_jit`` False while they are in use
        (`kerasdet.ops.xla.kernel_layer_supports_jit`), which Keras' rules read:

        - ``"auto"`` (the default): Keras' rule, XLA only on a GPU and only when every layer
          supports it; with the kernels loaded that is False. The choice is logged (logger
          "kerasdet") and readable as ``model.jit_compile``.
        - ``True``: the train / test / predict steps are traced with the pure-TensorFlow fallbacks
          (`kerasdet.ops._kernels.pure_tf`), which XLA compiles. A layer XLA cannot compile even
          then (RoIPool, RoIAlign with sampling_ratio=0) is an `XLAUnsupportedError` naming it.
        """
        import logging

        from kerasdet.ops import _kernels
        from kerasdet.ops.xla import unsupported

        for name in ("train_step", "test_step", "predict_step"):
            self.__dict__.pop(name, None)  # an earlier compile's pure-TF wrapper
        if jit_compile is True and not kwargs.get("run_eagerly"):
            with _kernels.pure_tf():
                blockers = [f"{type(layer).__name__} {layer.name!r}"
                            for layer in self._flatten_layers() if not layer.supports_jit]
                if blockers:
                    raise unsupported(f"{self.name}: its layer(s) {', '.join(blockers)}",
                                      "RoIPool has no fixed-shape form; RoIAlign-style poolers "
                                      "need a fixed sampling_ratio (e.g. 2).")
                # Keras checks the layers' supports_jit when jit_compile is set.
                super().compile(*args, jit_compile=True, **kwargs)
        else:
            super().compile(*args, jit_compile=jit_compile, **kwargs)
        if jit_compile == "auto":
            reason = ("the compiled kernels are in use and have no XLA implementation"
                      if _kernels.use_kernels() else "Keras' rule: a GPU and every layer supports it")
            logging.getLogger("kerasdet").info("%s: jit_compile='auto' -> %s (%s)", self.name,
                                               self.jit_compile, reason)
        if self.jit_compile:
            # Keras traces the steps on the first fit / evaluate / predict; under pure_tf() every
            # kernel op is traced as its builtin-op twin, which XLA can compile.
            for name in ("train_step", "test_step", "predict_step"):
                step = getattr(self, name)

                def traced_pure_tf(data, step=step):
                    with _kernels.pure_tf():
                        return step(data)

                object.__setattr__(self, name, traced_pure_tf)

    # -- input images ---------------------------------------------------------------------------
    def padding_value(self):
        """RGB 0..255 colour that the backbone's input normalization maps to 0, or None.

        torchvision and Detectron2 pad the *normalized* image with zeros; filling kerasdet's padding
        with this colour gives their backbones exactly the input they were trained on.
        """
        from kerasdet.backbones.base import ImageNormalization

        for layer in getattr(getattr(self, "backbone", None), "layers", ()):
            if isinstance(layer, ImageNormalization):
                return tuple(reversed(layer.mean)) if layer.bgr else tuple(layer.mean)
        return None

    def fill_padding(self, images, image_shapes):
        """Sets the pixels outside each image's valid [0, h) x [0, w) region to ``padding_value``."""
        value = self.padding_value()
        if value is None or not any(value):
            return images
        valid_hw = tf.cast(tf.round(image_shapes), tf.int32)
        rows = tf.range(tf.shape(images)[1])[None, :, None] < valid_hw[:, 0, None, None]
        cols = tf.range(tf.shape(images)[2])[None, None, :] < valid_hw[:, 1, None, None]
        valid = tf.logical_and(rows, cols)[..., None]
        return tf.where(valid, images, tf.constant(value, images.dtype))

    def input_images(self, inputs):
        """The images of a batch dict (or an image tensor) in the compute dtype, padding filled."""
        images = tf.cast(inputs["images"] if isinstance(inputs, dict) else inputs, self.compute_dtype)
        if isinstance(inputs, dict) and "image_info" in inputs:
            images = self.fill_padding(images, batch_image_shapes(inputs, images))
        return images

    def _with_input_images(self, batch):
        return dict(batch, images=self.input_images(batch)) if isinstance(batch, dict) else batch

    def call(self, inputs, training=False):
        images = self.input_images(inputs)
        return self.detect(images, batch_image_shapes(inputs, images), training=training)

    def _total(self, losses):
        total = tf.add_n([tf.cast(v, tf.float32) for v in losses.values()])
        if self.losses:  # weight decay and other regularizers
            total = total + tf.add_n([tf.cast(v, tf.float32) for v in self.losses])
        return total

    def _log(self, losses, total):
        values = {"loss": total, **losses}
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            # Every replica logs the mean over all replicas (one all-reduce of a few scalars), so the
            # logs are the same everywhere and the NaN guard stops all workers at the same step.
            names = list(values)
            reduced = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                         [tf.cast(values[n], tf.float32) for n in names])
            values = dict(zip(names, reduced))
        for name, value in values.items():
            self._trackers[name].update_state(value)
        logs = {name: tracker.result() for name, tracker in self._trackers.items()}
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras reduces the step's logs with strategy.reduce("MEAN", log, axis=0) under this
            # strategy, which fails on a scalar ("Invalid reduction dimension 0", Keras 3.15; the
            # upstream issue keras-team/keras#20585): a [1] vector reduces to the same scalar.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def train_step(self, data):
        batch = self._with_input_images(self._unpack(data))
        with tf.GradientTape() as tape:
            losses = self.compute_detection_losses(batch, training=True)
            total = self._total(losses)
            # The optimizer sums the replicas' gradients (SUM all-reduce); each replica's loss is
            # its share of the global-batch loss (kerasdet.losses.replica_mean_normalizer), so
            # dividing by the replica count makes N replicas take the one-device step.
            scaled = total / tf.cast(replicas_in_sync(), total.dtype)
            if hasattr(self.optimizer, "scale_loss"):  # float16 loss scaling
                scaled = self.optimizer.scale_loss(scaled)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(self._clipped_across_replicas(grads), variables)
        return self._log(losses, total)

    def _clipped_across_replicas(self, grads):
        """Gradient clipping on the global batch's gradient when replicas share the step.

        Keras clips each replica's gradient before its SUM all-reduce, so under N replicas the
        clipping threshold would act on 1/N-sized partial gradients (a different update than one
        device's). Here the replicas' gradients are summed first and clipped as Keras would clip the
        one-device gradient (clipnorm per tensor, global_clipnorm over all, clipvalue per element),
        then divided by N again: the optimizer's own clipping is then a no-op (every norm is at most
        threshold / N) and its all-reduce sums back exactly the clipped global gradient. Costs one
        extra all-reduce per step, only when a clipping option is set and N > 1.
        """
        context = tf.distribute.get_replica_context()
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        clip = {name: getattr(optimizer, name, None)
                for name in ("clipnorm", "global_clipnorm", "clipvalue")}
        if context is None or context.num_replicas_in_sync == 1 or not any(clip.values()):
            return grads
        present = [i for i, g in enumerate(grads) if g is not None]
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
        # Under float16 loss scaling the gradients carry the loss scale: clip the true gradient.
        loss_scale = (tf.cast(self.optimizer.scale_loss(tf.constant(1.0)), tf.float32)
                      if optimizer is not self.optimizer else tf.constant(1.0))
        summed = [tf.cast(g, tf.float32) / loss_scale for g in summed]
        if clip["clipnorm"]:
            summed = [tf.clip_by_norm(g, clip["clipnorm"]) for g in summed]
        if clip["global_clipnorm"]:
            summed, _ = tf.clip_by_global_norm(summed, clip["global_clipnorm"])
        if clip["clipvalue"]:
            summed = [tf.clip_by_value(g, -clip["clipvalue"], clip["clipvalue"]) for g in summed]
        share = loss_scale / tf.cast(context.num_replicas_in_sync, tf.float32)
        grads = list(grads)
        for i, g in zip(present, summed):
            grads[i] = tf.cast(g * share, grads[i].dtype)
        return grads

    def test_step(self, data):
        batch = self._with_input_images(self._unpack(data))
        losses = self.compute_detection_losses(batch, training=False)
        return self._log(losses, self._total(losses))

    def predict_step(self, data):
        batch = self._unpack(data)
        return self(batch, training=False)

    # -- what the model remembers about its data (part of the config, so .keras files keep it) ----
    @property
    def class_names(self):
        """Names of classes 0..K-1 (tuple of str), or None when the model was built without them."""
        return self._class_names

    @class_names.setter
    def class_names(self, names):
        if names is not None:
            names = tuple(str(name) for name in names)
            if len(names) != self.num_classes:
                raise ValueError(f"class_names has {len(names)} names {list(names)} but the model has "
                                 f"num_classes={self.num_classes}")
        self._class_names = names

    @property
    def input_settings(self):
        """The resize rule the model was trained with (see kerasdet.data.resize.ResizeRule), or None."""
        return None if self._input_settings is None else json.loads(self._input_settings)

    @input_settings.setter
    def input_settings(self, settings):
        if settings is not None:
            from kerasdet.data.resize import ResizeRule

            # Kept as JSON text: Keras would wrap a dict attribute in a tracked container.
            settings = json.dumps(ResizeRule.from_settings(settings).to_settings(), sort_keys=True)
        self._input_settings = settings

    @property
    def kerasdet_input(self):
        """Older name of ``input_settings``."""
        return self.input_settings

    @kerasdet_input.setter
    def kerasdet_input(self, settings):
        self.input_settings = settings

    def get_config(self):
        config = {"num_classes": self.num_classes, "name": self.name}
        if self.class_names is not None:
            config["class_names"] = list(self.class_names)
        if self.input_settings is not None:
            config["input_settings"] = dict(self.input_settings)
        return config
