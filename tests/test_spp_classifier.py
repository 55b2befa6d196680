"""SPP-net classifier (kerasdet.models.spp_classifier): fixed-length output for any input size and
multi-size training (224 / 180 alternating by epoch, scaled down to 64 / 52 here).

Learning figure (tiny backbone, C3 features, levels (4, 2, 1), fc 64-64, dropout 0.5; 360 crops of
the synthetic single-shape images, 3 classes, 8 epochs alternating 64 / 52 with Adam 2e-3): held-out
accuracy 1.00 at 64 and 1.00 at 52 on 120 crops when written (chance 0.33); asserted >= 0.85.
"""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kerasdet.models.spp_classifier import SPPClassifier, multi_size_dataset


def test_zf5_classifier_same_length_for_224_and_180():
    model = SPPClassifier(7, backbone="zf5", fc_dims=(16, 16))
    for size in (224, 180):
        images = tf.random.uniform([2, size, size, 3], 0, 255, seed=size)
        assert model.features(images).shape == (2, 256 * 50)  # conv5 13x13 and 10x10
        assert model(images).shape == (2, 7)
    assert model.backbone(tf.zeros([1, 180, 180, 3]))["conv5"].shape[1:3] == (10, 10)


def test_config_round_trip_and_argument_errors():
    model = SPPClassifier(3, backbone="tiny", levels=(2, 1), fc_dims=(8,), dropout=0.1,
                          feature="C3", backbone_kwargs={"channels": [4, 4, 4, 4, 4]})
    clone = SPPClassifier.from_config(model.get_config())
    x = tf.random.uniform([1, 40, 48, 3], 0, 255, seed=0)
    assert clone(x).shape == model(x).shape == (1, 3)
    assert clone.feature == "C3" and clone.levels == (2, 1) and clone.fc_dims == (8,)
    with pytest.raises(ValueError, match="`backbone` must be one of .* got 'vgg'"):
        SPPClassifier(3, backbone="vgg")
    with pytest.raises(ValueError, match="`feature` must be one of .* got 'conv5'"):
        SPPClassifier(3, backbone="tiny", feature="conv5")


def test_multi_size_dataset_alternates_sizes_by_epoch():
    images = tf.random.uniform([6, 64, 64, 3], seed=1)
    base = tf.data.Dataset.from_tensor_slices((images, tf.range(6))).batch(2)
    data, steps = multi_size_dataset(base, epochs=3, sizes=(64, 52))
    assert steps == 3
    sizes = [int(x.shape[1]) for x, _ in data]
    assert sizes == [64] * 3 + [52] * 3 + [64] * 3
    first = next(iter(data))[0]
    np.testing.assert_allclose(first.numpy(), images[:2].numpy(), atol=1e-6)  # same-size: as is
    resumed, _ = multi_size_dataset(base, epochs=3, sizes=(64, 52), first_epoch=1)
    assert [int(x.shape[1]) for x, _ in resumed] == [52] * 3 + [64] * 3
    with pytest.raises(ValueError, match="finite"):
        multi_size_dataset(base.repeat(), epochs=2)


def _crops(root, count, seed, size=64):
    from kerasdet.data.synthetic import make_dataset
    data = make_dataset(str(root), count, seed=seed, image_size=(64, 64), num_classes=3,
                        object_size=(18, 44), min_objects=1, max_objects=1,
                        write_instance_pngs=False)
    images, labels = [], []
    for record in data.records:
        image = np.asarray(Image.open(data.image_file(record)).convert("RGB"))
        x1, y1, x2, y2 = record.boxes[0]
        pad = 4  # a little context, as SPP-net's warped / cropped windows have
        crop = image[max(int(y1) - pad, 0):int(np.ceil(y2)) + pad,
                     max(int(x1) - pad, 0):int(np.ceil(x2)) + pad]
        images.append(np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)))
        labels.append(int(record.labels[0]))
    return np.stack(images).astype(np.float32), np.array(labels, np.int32)


def test_tiny_classifier_learns_with_multi_size_training(tmp_path):
    import keras
    keras.utils.set_random_seed(0)
    x_train, y_train = _crops(tmp_path / "train", 360, seed=1)
    x_val, y_val = _crops(tmp_path / "val", 120, seed=2)
    model = SPPClassifier(3, backbone="tiny", levels=(4, 2, 1), fc_dims=(64, 64), feature="C3")
    model.compile(keras.optimizers.Adam(2e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    base = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(360, seed=0).batch(24)
    epochs = 8
    data, steps = multi_size_dataset(base, epochs=epochs, sizes=(64, 52))
    model.fit(data, epochs=epochs, steps_per_epoch=steps, verbose=0)
    accuracy = {}
    for size in (64, 52):
        images = tf.image.resize(x_val, (size, size))
        predicted = np.argmax(model.predict(images, batch_size=60, verbose=0), axis=-1)
        accuracy[size] = float(np.mean(predicted == y_val))
    print("held-out accuracy", accuracy)
    assert min(accuracy.values()) >= 0.85, accuracy


def test_mixed_precision_and_keras_file_round_trip(tmp_path):
    import keras
    x = tf.random.uniform([2, 48, 40, 3], 0, 255, seed=3)
    model = SPPClassifier(4, backbone="tiny", levels=(2, 1), fc_dims=(8,), feature="C3")
    expected = model(x).numpy()
    path = str(tmp_path / "spp.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        mixed = SPPClassifier(4, backbone="tiny", levels=(2, 1), fc_dims=(8,), feature="C3")
        assert mixed.features(x).dtype == tf.float16
        assert mixed(x).dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
