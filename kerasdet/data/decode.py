"""Image decoding inside tf.data graphs (the TensorFlow counterpart of kerasdet.data.images)."""
import tensorflow as tf

from kerasdet.data.images import read_image


def _bytes_at(contents, start, count):
    """int64 [count] of the bytes at ``start`` (zeros where the string is shorter)."""
    part = tf.strings.substr(contents, start, count)
    padded = tf.strings.join([part, tf.strings.substr(tf.constant(b"\0" * count), 0,
                                                       count - tf.strings.length(part))])
    return tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)


def _big_endian(b):
    return b[0] * 16777216 + b[1] * 65536 + b[2] * 256 + b[3]


def _header_size_not_jpeg(contents):
    """int64 [2] (height, width) of PNG / GIF / BMP headers, [0, 0] for other bytes."""
    def png():
        b = _bytes_at(contents, 16, 8)
        return tf.stack([_big_endian(b[4:]), _big_endian(b[:4])])

    def gif():
        b = _bytes_at(contents, 6, 4)
        return tf.stack([b[2] + 256 * b[3], b[0] + 256 * b[1]])

    def bmp():
        b = _bytes_at(contents, 18, 8)
        width = b[0] + 256 * b[1] + 65536 * b[2] + 16777216 * b[3]
        height = b[4] + 256 * b[5] + 65536 * b[6] + 16777216 * b[7]
        height = tf.where(height >= 2 ** 31, 2 ** 32 - height, height)  # negative: top-down rows
        return tf.stack([height, width])

    return tf.case([(tf.equal(tf.strings.substr(contents, 0, 4), b"\x89PNG"), png),
                    (tf.equal(tf.strings.substr(contents, 0, 3), b"GIF"), gif),
                    (tf.equal(tf.strings.substr(contents, 0, 2), b"BM"), bmp)],
                   default=lambda: tf.zeros([2], tf.int64), exclusive=False)


def _jpeg_header_size(contents):
    return tf.cast(tf.io.extract_jpeg_shape(contents)[:2], tf.int64)


def encoded_image_size(contents):
    """int64 [2] (height, width) that the header of JPEG / PNG / GIF / BMP bytes declares, read
    without decoding the pixels; [0, 0] for other bytes (the decoder then refuses them)."""
    contents = tf.convert_to_tensor(contents, tf.string)
    return tf.cond(tf.io.is_jpeg(contents), lambda: _jpeg_header_size(contents),
                   lambda: _header_size_not_jpeg(contents))


def _pixel_limit(max_pixels):
    from kerasdet.data.images import max_image_pixels

    return max_image_pixels() if max_pixels is None else int(max_pixels)


def _assert_size(size, limit, name):
    # The raw op: tf.debugging.Assert adds a tf.cond around string data.
    return tf.raw_ops.Assert(
        condition=size[0] * size[1] <= limit,
        data=[tf.constant(f"{name}the image declares (height, width)"), size,
              tf.constant(f"more pixels than the limit of {limit} (a decompression bomb, or raise "
                          "max_image_pixels / KERASDET_MAX_IMAGE_PIXELS)")], summarize=3)


def check_encoded_size(contents, max_pixels=None, name=""):
    """An op that fails, naming ``name`` and the limit, when the header of ``contents`` declares more
    than ``max_pixels`` pixels (default: kerasdet.data.images.max_image_pixels() at trace time):
    decoding would allocate what the header says (decompression bombs)."""
    return _assert_size(encoded_image_size(contents), _pixel_limit(max_pixels), name)


def decode_image_bytes(contents, max_pixels=None, name="", check_header=True):
    """uint8 [h, w, 3] RGB from encoded JPEG / PNG (8 or 16 bit) / BMP / GIF bytes.

    JPEGs use the accurate integer IDCT: measured, tf.io's default (fast) IDCT differs from Pillow /
    libjpeg's by up to 6 levels on RGB, gray and CMYK files, the accurate one by 0, so images decoded
    here and by read_image (e.g. at inference time) are identical.

    The header's size is checked against ``max_pixels`` first (see ``check_encoded_size``), so a
    few KB declaring 50000 x 50000 fail before anything of that size is allocated.
    ``check_header=False`` leaves the check out where the size was checked before (the
    DetectionDataset pipeline: its readers read every header): measured, it costs about 0.4 ms of
    CPU per 640 x 480 JPEG (3.5 -> 3.9 ms) on 2 busy cores.
    """
    limit = _pixel_limit(max_pixels)

    def checked(size):
        return [_assert_size(size, limit, name)] if check_header else []

    def jpeg():
        with tf.control_dependencies(checked(_jpeg_header_size(contents)) if check_header else []):
            return tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE")

    def other():
        with tf.control_dependencies(checked(_header_size_not_jpeg(contents)) if check_header else []):
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
