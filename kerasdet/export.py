"""SavedModel export of kerasdet detectors for TF Serving and plain `tf.saved_model.load`.

The SavedModel follows the TF Object Detection API serving convention:

    serving_default(images: uint8 [B, H, W, 3])           -> detections of the batch
    serving_bytes(encoded_images: string [B])             -> same, from PNG / JPEG / BMP / GIF bytes

    detection_boxes    float32 [B, K, 4]  (ymin, xmin, ymax, xmax) relative to each input image, in [0, 1]
    detection_scores   float32 [B, K]
    detection_classes  float32 [B, K]     1-based class ids (0 on padded rows)
    num_detections     float32 [B]
    detection_masks    float32 [B, K, M, M] (mask models only) per-box mask probabilities in box
                       coordinates, as the TF OD API returns them (clients paste them into the image)

A model that knows its class names (``model.class_names``) also gets assets/label_map.pbtxt (the TF OD
API label map: id k + 1 = class k) and assets/class_names.json.

Pre-processing is inside the graph: cast to float, resize by the model's own rule
(`kerasdet.data.resize.ResizeRule` from its ``input_settings``: the rule of training, evaluation and
predict), pad to a fixed canvas (the model fills the padding with its normalization mean); then the
model's own decoding and NMS.
"""
import contextlib
import json
import os

import keras
import tensorflow as tf

__all__ = ["export_saved_model", "serving_input_settings"]


def serving_input_settings(model, image_size=None):
    """The resize rule (`kerasdet.data.resize.ResizeRule`) the exported graph applies.

    An explicit ``image_size`` (int or (H, W)) wins (letterbox into it); else the model's own
    ``input_settings`` (part of its config; zoo.load and the drivers set them).
    """
    from kerasdet.data.resize import ResizeRule

    if image_size is not None:
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be an int or (height, width) > 0, got {image_size!r}")
        return ResizeRule(image_size=(int(image_size[0]), int(image_size[1])))
    settings = getattr(model, "input_settings", None)
    if not settings:
        raise ValueError("export_saved_model: the model carries no input settings (it was not made "
                         "by kerasdet.zoo.load or a kerasdet run); pass image_size=(height, width)")
    rule = ResizeRule.from_settings(settings)
    if rule.image_size is None and rule.max_size is None:
        raise ValueError(f"export_saved_model: input settings {settings} need image_size or max_size "
                         "to fix the exported canvas; pass image_size=(height, width)")
    return rule


def _prepare_one(image, rule, canvas):
    """float32 [h, w, 3] -> (image zero-padded to the fixed canvas, image_info [6])."""
    resized, info = rule.resize(image)
    return tf.image.pad_to_bounding_box(resized, 0, 0, canvas[0], canvas[1]), info


def _to_od_api(outputs, image_info):
    """The model's predict dict (network-input pixels) -> TF OD API outputs."""
    boxes = tf.cast(outputs["boxes"], tf.float32)
    new_h = image_info[:, 4][:, None]
    new_w = image_info[:, 5][:, None]
    normalized = tf.stack([boxes[..., 1] / new_h, boxes[..., 0] / new_w,
                           boxes[..., 3] / new_h, boxes[..., 2] / new_w], axis=-1)
    classes = tf.cast(outputs["classes"], tf.int32)
    valid = classes >= 0
    result = {
        "detection_boxes": tf.where(valid[..., None], tf.clip_by_value(normalized, 0.0, 1.0), 0.0),
        "detection_scores": tf.where(valid, tf.cast(outputs["scores"], tf.float32), 0.0),
        "detection_classes": tf.cast(tf.where(valid, classes + 1, 0), tf.float32),
        "num_detections": tf.cast(outputs["num_detections"], tf.float32),
    }
    if outputs.get("masks") is not None:
        result["detection_masks"] = tf.cast(outputs["masks"], tf.float32)
    return result


def export_saved_model(model, export_dir, portable=True, image_size=None, verbose=False,
                       max_image_pixels=None):
    """Writes ``model`` as a SavedModel with the `serving_default` (uint8 batch) and
    `serving_bytes` (encoded images) signatures described in the module docstring.

    Args:
      model: a built kerasdet detector (its call takes {"images", "image_info"}).
      export_dir: output folder (must not exist or be empty).
      portable: trace under kerasdet.ops._kernels.pure_tf(), so that the graph holds builtin
        TensorFlow ops only and loads where kerasdet (and its kernel library) is not installed.
        False keeps the compiled kernels (faster; the serving process must load kerasdet's .so).
      image_size: the network input (H, W) to resize into; default: the zoo entry's input settings.
      verbose: let Keras list the exported variables.
      max_image_pixels: `serving_bytes` refuses images whose header declares more pixels, before
        decoding them (default: kerasdet.data.images.max_image_pixels(), 100 megapixels).

    Bad requests (an empty batch, a zero-sized image, bytes that are not an image, a decompression
    bomb; a wrong dtype or rank is refused by the signature) get an InvalidArgumentError naming the
    signature and input, and the serving process goes on.

    Returns:
      export_dir.
    """
    from kerasdet.ops import _kernels

    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    export_dir = os.fspath(export_dir)
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        raise FileExistsError(f"export_dir {export_dir!r} exists and is not empty")
    rule = serving_input_settings(model, image_size)
    canvas = rule.max_canvas()
    if not model.built:
        model.build((1, canvas[0], canvas[1], 3))

    def detect(images, image_info):
        outputs = model({"images": images, "image_info": image_info}, training=False)
        return _to_od_api(outputs, image_info)

    def check_batch(images, signature):
        # Errors, not crashes, for what a serving client can send: an empty batch, an empty image.
        shape = tf.shape(images)
        return [tf.debugging.assert_positive(shape[0], message=f"{signature}: empty batch (0 images)"),
                tf.debugging.assert_positive(tf.reduce_min(shape[1:3]) if images.shape.rank == 4
                                             else tf.constant(1),
                                             message=f"{signature}: an image has height or width 0")]

    def serve_images(images):
        with tf.control_dependencies(check_batch(images, "serving_default")):
            images = tf.cast(images, tf.float32)
        padded, info = tf.map_fn(
            lambda image: _prepare_one(image, rule, canvas), images,
            fn_output_signature=(tf.TensorSpec([canvas[0], canvas[1], 3], tf.float32),
                                 tf.TensorSpec([6], tf.float32)))
        return detect(padded, info)

    def serve_bytes(encoded_images):
        from kerasdet.data.decode import check_encoded_size, encoded_image_size

        def decode(data_and_index):
            data, index = data_and_index
            where = tf.strings.format("serving_bytes: input {}", index)
            known = tf.debugging.Assert(tf.reduce_all(encoded_image_size(data) > 0), [
                where, "is not a JPEG, PNG, GIF or BMP image (or declares a zero size)"])
            # A few KB declaring 50000 x 50000 would make the decoder allocate gigabytes.
            bomb = check_encoded_size(data, max_image_pixels, "serving_bytes: ")
            with tf.control_dependencies([known, bomb]):
                image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return _prepare_one(tf.cast(image, tf.float32), rule, canvas)

        count = tf.shape(encoded_images)[0]
        with tf.control_dependencies([tf.debugging.assert_positive(
                count, message="serving_bytes: empty batch (0 images)")]):
            indices = tf.range(count)
        padded, info = tf.map_fn(
            decode, (encoded_images, indices),
            fn_output_signature=(tf.TensorSpec([canvas[0], canvas[1], 3], tf.float32),
                                 tf.TensorSpec([6], tf.float32)))
        return detect(padded, info)

    archive = keras.export.ExportArchive()
    context = _kernels.pure_tf() if portable else contextlib.nullcontext()
    with context, _box_relative_masks(model):
        archive.track(model)
        archive.add_endpoint("serving_default", serve_images, input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
        archive.add_endpoint("serving_bytes", serve_bytes, input_signature=[
            tf.TensorSpec([None], tf.string, name="encoded_images")])
        archive.write_out(export_dir, verbose=verbose)
    _write_label_map(model, export_dir)
    return export_dir


def _write_label_map(model, export_dir):
    """assets/label_map.pbtxt (the TF OD API's label map: `detection_classes` id -> name) and
    assets/class_names.json, when the model knows its class names."""
    names = getattr(model, "class_names", None)
    if not names:
        return
    assets = os.path.join(export_dir, "assets")
    os.makedirs(assets, exist_ok=True)
    with open(os.path.join(assets, "class_names.json"), "w", encoding="utf-8") as handle:
        json.dump(list(names), handle, indent=1)
    with open(os.path.join(assets, "label_map.pbtxt"), "w", encoding="utf-8") as handle:
        for index, name in enumerate(names):
            handle.write(f"item {{\n  id: {index + 1}\n  name: {json.dumps(name)}\n}}\n")


@contextlib.contextmanager
def _box_relative_masks(model):
    """Mask models trace with per-box mask grids (the OD API layout) instead of canvas-sized masks:
    smaller outputs, and the canvas (padding included) means nothing to a serving client."""
    pasting = getattr(model, "paste_masks", None)
    if pasting:
        model.paste_masks = False
    try:
        yield
    finally:
        if pasting:
            model.paste_masks = pasting
