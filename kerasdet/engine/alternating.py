"""The Faster R-CNN paper's 4-step alternating training (Ren et al. 2015, section 3.2) as four fits.

Two detectors of the same configuration take part: A, only for the first step, and B, the network
that comes out.
    1. RPN       A's RPN losses; trains A's shared convs (backbone + neck) and RPN.
    2. detector  B's RoI losses on A's proposals (A frozen, proposals constants); trains B's shared
                 convs and RoI head. B's backbone starts afresh, as A's did (pretrained or random).
    3. RPN       B's RPN losses with B's shared convs frozen; trains B's RPN only. B's RPN was not
                 touched by step 2, so it starts from its initialisation, as in the paper's code.
    4. detector  B's RoI losses on B's own (step-3) proposals, shared convs and RPN frozen; trains
                 B's RoI head only.
Each step is a `loop.train_model` run (the run's recipe: its epochs, warm-up and decay, a fresh
optimizer; NaN guard, checkpoints and resume as any run) of an `AlternatingStep`, a keras.Model whose
train_step computes that step's losses and updates that step's variables only. Frozen shared convs
and RPN have `trainable = False`, so their normalization layers also stop updating statistics.

A run writes into OUT:
    OUT/step{1..4}/            the step's fit: checkpoints/, backup/ (--resume), logs/, history.csv
    OUT/step{1..4}.weights.h5  the step's detector (A after step 1, B after steps 2, 3, 4)
    OUT/model.weights.h5       the unified network, B after step 4
With ``resume``, a step whose OUT/step{k}.weights.h5 exists is loaded instead of run again.

Everything this module needs from a detector is in the adapter functions below (`check_splittable`,
`shared_layers`, `rpn_layers`, `roi_head_layers`, `rpn_losses`, `propose`, `roi_losses`).
"""
import os

import keras
import tensorflow as tf

from kerasdet.engine.loop import train_model
from kerasdet.models.base import batch_image_shapes, ground_truth, ground_truth_crowd

__all__ = ["AlternatingStep", "STEPS", "check_splittable", "shared_layers", "rpn_layers",
           "roi_head_layers", "rpn_losses", "propose", "roi_losses", "build_step", "run_step",
           "step_weights_path", "train_alternating"]

STEPS = (1, 2, 3, 4)
RPN_LOSS_NAMES = ("rpn_cls", "rpn_box")


# -- the adapter: what alternating training needs from a two-stage detector ----------------------
def check_splittable(model):
    """Raises ValueError unless ``model`` has an RPN and separable first / second stages."""
    name = type(model).__name__
    if getattr(model, "rpn_head", None) is None:
        raise ValueError(f"--alternating: {name} has no region proposal network to alternate with "
                         "(Fast R-CNN takes external proposals); train it without --alternating")
    needed = ("backbone", "features", "rpn", "proposals", "first_stage", "second_stage_losses")
    missing = [attr for attr in needed if not hasattr(model, attr)]
    if missing:
        raise ValueError(f"--alternating: {name} cannot be split into an RPN stage and a detection "
                         f"stage (it lacks {', '.join(missing)})")
    if not roi_head_layers(model):
        raise ValueError(f"--alternating: {name} has no layers after the proposals to train")
    # The head is "every other layer"; a layer there that also holds backbone or RPN weights would
    # let a step train what it must keep frozen.
    owned = {id(w) for layer in shared_layers(model) + rpn_layers(model) for w in layer.weights}
    shared = [w.path for layer in roi_head_layers(model) for w in layer.weights if id(w) in owned]
    if shared:
        raise ValueError(f"--alternating: {name} cannot be split into its stages: layers after the "
                         f"proposals also hold backbone / neck / RPN weights ({', '.join(shared[:3])})")


def shared_layers(model):
    """The convs the RPN and the detection head share: backbone and neck."""
    neck = getattr(model, "neck", None)
    return [model.backbone] + ([neck] if neck is not None else [])


def rpn_layers(model):
    return [model.rpn_head]


def roi_head_layers(model):
    """Every other layer of the detector: what works on the proposals (RoI pooling, box head and
    predictor, mask or cascade heads)."""
    taken = {id(layer) for layer in shared_layers(model) + rpn_layers(model)}
    return [layer for layer in model.layers if id(layer) not in taken]


def rpn_losses(model, batch):
    """{"rpn_cls", "rpn_box"} of a training batch (images already padding-filled)."""
    losses = model.first_stage(batch, training=True)["losses"]
    return {name: losses[name] for name in RPN_LOSS_NAMES}


def propose(model, batch):
    """(proposals [B, P, 4], valid [B, P]) of ``model``'s RPN at its training settings, as constants:
    what another detector trains its RoI head on."""
    images = tf.cast(batch["images"], model.compute_dtype)
    rpn_features, _ = model.features(images, training=False)
    logits, deltas, anchors = model.rpn(rpn_features)
    boxes, _, valid = model.proposals(logits, deltas, anchors, batch_image_shapes(batch, images),
                                      training=True)
    return tf.stop_gradient(boxes), tf.stop_gradient(valid)


def roi_losses(model, batch, proposals=None):
    """The losses after the proposals (box, and mask or cascade where the model has them), on the
    ``proposals`` (boxes, valid) of `propose`, or on the model's own RPN's when None."""
    if proposals is None:
        return model.second_stage_losses(model.first_stage(batch, training=True), training=True)
    images = tf.cast(batch["images"], model.compute_dtype)
    gt_boxes, gt_labels = ground_truth(batch)
    _, roi_features = model.features(images, training=True)
    context = dict(batch=batch, images=images, image_shapes=batch_image_shapes(batch, images),
                   gt_boxes=gt_boxes, gt_labels=gt_labels, gt_crowd=ground_truth_crowd(batch),
                   roi_features=roi_features, proposals=proposals[0], proposal_valid=proposals[1])
    return model.second_stage_losses(context, training=True)


# -- one step as a Keras model --------------------------------------------------------------------
class AlternatingStep(keras.Model):
    """fit() of one step: ``step_losses(batch)`` minimised over ``train_layers``' variables only.

    ``detectors`` are tracked so that checkpoints and the resume state hold them; ``detectors[-1]``
    fills the images' padding (`Detector.input_images`)."""

    def __init__(self, detectors, step_losses, train_layers, loss_names, **kwargs):
        super().__init__(**kwargs)
        self.detectors = list(detectors)
        self.step_losses = step_losses
        self.train_layers = list(train_layers)
        self._trackers = {name: keras.metrics.Mean(name=name) for name in ("loss",) + tuple(loss_names)}
        self.built = True  # the detectors are built; the wrapper has no weights of its own

    def build(self, input_shape=None):
        pass

    def fit(self, *args, **kwargs):
        kwargs.setdefault("shuffle", False)  # the pipeline shuffles; Keras' flag would only warn
        return super().fit(*args, **kwargs)

    @property
    def metrics(self):
        return list(self._trackers.values())

    def train_step(self, data):
        batch = data[0] if isinstance(data, tuple) else data
        batch = dict(batch, images=self.detectors[-1].input_images(batch))
        with tf.GradientTape() as tape:
            losses = self.step_losses(batch)
            total = tf.add_n([tf.cast(v, tf.float32) for v in losses.values()])
            if self.losses:  # regularizers
                total = total + tf.add_n([tf.cast(v, tf.float32) for v in self.losses])
            scaled = self.optimizer.scale_loss(total) if hasattr(self.optimizer, "scale_loss") else total
        variables = [v for layer in self.train_layers for v in layer.trainable_variables]
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self._trackers["loss"].update_state(total)
        for name, value in losses.items():
            self._trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self._trackers.items()}


def _freeze(layers):
    # Only ever set to False: setting True would also unfreeze what a backbone keeps frozen inside
    # (freeze_at stages, frozen normalization), since Keras propagates the flag to sublayers.
    for layer in layers:
        layer.trainable = False


def build_step(number, first, second):
    """(AlternatingStep, the detector the step trains) of step ``number`` on detectors A, B."""
    rpn_names = RPN_LOSS_NAMES
    roi_names = tuple(n for n in second.loss_names if n not in rpn_names)
    if number == 1:
        return AlternatingStep([first], lambda b: rpn_losses(first, b),
                               shared_layers(first) + rpn_layers(first), rpn_names, name="step1"), first
    if number == 2:
        _freeze([first])
        return AlternatingStep([first, second], lambda b: roi_losses(second, b, propose(first, b)),
                               shared_layers(second) + roi_head_layers(second), roi_names,
                               name="step2"), second
    if number == 3:
        _freeze(shared_layers(second))
        return AlternatingStep([second], lambda b: rpn_losses(second, b), rpn_layers(second),
                               rpn_names, name="step3"), second
    if number == 4:
        _freeze(shared_layers(second) + rpn_layers(second))
        return AlternatingStep([second], lambda b: roi_losses(second, b), roi_head_layers(second),
                               roi_names, name="step4"), second
    raise ValueError(f"alternating training has steps {STEPS}, not {number!r}")


def step_weights_path(out_dir, number):
    return os.path.join(out_dir, f"step{number}.weights.h5")


def run_step(number, first, second, train_ds, out_dir, recipe, steps_per_epoch=None, resume=False,
             verbose=1):
    """Fits step ``number`` into OUT/step{number}/ and saves its detector as OUT/step{number}.weights.h5
    (not after a NaN stop). Returns `train_model`'s dict."""
    step, detector = build_step(number, first, second)
    run = train_model(step, train_ds, os.path.join(out_dir, f"step{number}"), recipe,
                      steps_per_epoch=steps_per_epoch, resume=resume, verbose=verbose)
    if not run["stopped_on_nan"]:
        detector.save_weights(step_weights_path(out_dir, number))
    return run


def train_alternating(first, second, train_ds, out_dir, recipe, steps_per_epoch=None, resume=False,
                      verbose=1, say=print):
    """The four steps on two freshly built detectors of one configuration; ``second`` ends as the
    unified network (saved as OUT/model.weights.h5) with its shared convs and RPN frozen. Returns
    {"history": {"step1": ..., ...}, "stopped_on_nan", "message"} like `train_model`."""
    for model in (first, second):
        check_splittable(model)
        model.build()
    histories = {}
    for number in STEPS:
        path = step_weights_path(out_dir, number)
        if resume and os.path.isfile(path):
            (first if number == 1 else second).load_weights(path)
            say(f"alternating step {number}/4: done before, loaded {os.path.basename(path)}")
            continue
        say(f"alternating step {number}/4: {_STEP_TITLES[number]}")
        run = run_step(number, first, second, train_ds, out_dir, recipe, steps_per_epoch, resume, verbose)
        if run["stopped_on_nan"]:
            return {"history": histories, "stopped_on_nan": True,
                    "message": f"alternating step {number}: {run['message']}"}
        histories[f"step{number}"] = run["history"]
    second.save_weights(os.path.join(out_dir, "model.weights.h5"))
    return {"history": histories, "stopped_on_nan": False, "message": None}


_STEP_TITLES = {1: "RPN (shared convs + RPN trained, RPN losses)",
                2: "detector on the step-1 proposals (fresh shared convs + RoI head, RoI losses)",
                3: "RPN fine-tuned on the step-2 shared convs (frozen; RPN trained)",
                4: "RoI head fine-tuned on the step-3 proposals (shared convs and RPN frozen)"}
