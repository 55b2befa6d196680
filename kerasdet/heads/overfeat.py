"""OverFeat's classifier and localization regressor as convolutions over the pooled top map
(Sermanet et al., ICLR 2014, sections 3.3 and 4.2, figure 8).

Both take a k x k neighbourhood of the pooled layer-5 map (k = 5 for the accurate model, 6 fast)
and are then 1 x 1: applied to a bigger map they slide, one output per pooled cell, and applied to
each of the offset-pooled copies (kerasdet.ops.overfeat) they give the fine-stride maps.
"""
import keras


@keras.saving.register_keras_serializable(package="kerasdet")
class OverFeatClassifier(keras.layers.Layer):
    """fc layers as convolutions: k x k -> dims[0], 1 x 1 -> dims[1], ..., 1 x 1 -> num_outputs;
    ReLU and dropout after each hidden layer (the paper's dropout 0.5 on its layers 6 and 7)."""

    def __init__(self, num_outputs, kernel_size, dims=(4096, 4096), dropout=0.5, **kwargs):
        super().__init__(**kwargs)
        self.num_outputs, self.kernel_size = int(num_outputs), int(kernel_size)
        self.dims, self.dropout = tuple(int(d) for d in dims), float(dropout)
        # N(0, 1e-2) as the paper's section 3.1 initialisation
        init = keras.initializers.RandomNormal(0.0, 0.01)
        self.hidden = [keras.layers.Conv2D(d, self.kernel_size if i == 0 else 1, activation="relu",
                                           kernel_initializer=init, name=f"fc{i + 1}")
                       for i, d in enumerate(self.dims)]
        self.drops = [keras.layers.Dropout(self.dropout) for _ in self.dims]
        self.out = keras.layers.Conv2D(self.num_outputs, self.kernel_size if not self.dims else 1,
                                       kernel_initializer=init, name="out")

    def call(self, x, training=False):
        for layer, drop in zip(self.hidden, self.drops):
            x = drop(layer(x), training=training)
        return self.out(x)

    def get_config(self):
        return {**super().get_config(), "num_outputs": self.num_outputs, "kernel_size": self.kernel_size,
                "dims": list(self.dims), "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="kerasdet")
class OverFeatRegressor(OverFeatClassifier):
    """The regression network of figure 8: k x k -> 4096 -> 1024 -> 4 box edges per window, or
    4 per class (one final layer per class, the paper's per-class regressor "PCR"; shared = "SCR").
    No dropout (the paper mentions none for it). Outputs are the edges' offsets from the window in
    units of the window size."""

    def __init__(self, num_classes, kernel_size, dims=(4096, 1024), class_specific=False, **kwargs):
        kwargs.pop("num_outputs", None)
        kwargs.pop("dropout", None)
        self.num_classes, self.class_specific = int(num_classes), bool(class_specific)
        super().__init__(4 * self.num_classes if self.class_specific else 4, kernel_size, dims,
                         dropout=0.0, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("num_outputs")
        config.pop("dropout")
        return {**config, "num_classes": self.num_classes, "class_specific": self.class_specific}
