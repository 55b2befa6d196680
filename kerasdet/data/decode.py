"""Image decoding inside tf.data graphs (the TensorFlow counterpart of kerasdet.data.images)."""
import tensorflow as tf

from kerasdet.data.images import read_image


def decode_image_bytes(contents):
    """uint8 [h, w, 3] RGB from encoded JPEG / PNG (8 or 16 bit) / BMP / GIF bytes.

    JPEGs use the accurate integer IDCT: measured, tf.io's default (fast) IDCT differs from Pillow /
    libjpeg's by up to 6 levels on RGB, gray and CMYK files, the accurate one by 0, so images decoded
    here and by read_image (e.g. at inference time) are identical.
    """
    def jpeg():
        return tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE")

    def other():
        return tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)

    image = tf.cond(tf.io.is_jpeg(contents), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def decode_image_file_python(path):
    """read_image (Pillow / tifffile) in the graph; its BadInputError, naming the file, becomes the
    tf.data error. Needed for TIFF, which tf.io cannot decode."""
    image = tf.numpy_function(lambda p: read_image(p.decode()), [path], tf.uint8, stateful=False)
    image = tf.reshape(image, tf.concat([tf.shape(image)[:2], [3]], 0))
    image.set_shape([None, None, 3])
    return image
