"""Training recipes: a zoo entry's schedule with kerasdet's defaults, adapted to a run (batch size,
epochs, warm-up), and the optimizer it describes."""
import math

import keras
import numpy as np
import tensorflow as tf

__all__ = ["WarmupStepSchedule", "TrainingRecipe", "MAX_WARMUP_FRACTION", "adapt_recipe", "format_recipe",
           "make_optimizer"]


# The registered name ("kerasdet>WarmupStepSchedule") is what saved .keras files refer to: keep it
# when the class moves, so that files saved before still load.
@keras.saving.register_keras_serializable(package="kerasdet")
class WarmupStepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from ``warmup_factor * lr`` to ``lr`` over ``warmup_steps``, then ``lr``
    multiplied by ``decay_factor`` at each step in ``decay_steps`` (the papers' step schedule).

    Keras has PiecewiseConstantDecay and a warm-up only inside CosineDecay, hence this small schedule.
    """

    def __init__(self, learning_rate, decay_steps=(), decay_factor=0.1, warmup_steps=0,
                 warmup_factor=0.001):
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.learning_rate = float(learning_rate)
        self.decay_steps = tuple(int(s) for s in decay_steps)
        if list(self.decay_steps) != sorted(self.decay_steps):
            raise ValueError(f"decay_steps must be increasing, got {decay_steps}")
        self.decay_factor = float(decay_factor)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        boundaries = tf.constant(self.decay_steps or (np.inf,), tf.float32)
        passed = tf.reduce_sum(tf.cast(step >= boundaries, tf.float32))
        rate = self.learning_rate * tf.pow(self.decay_factor, passed)
        if self.warmup_steps > 0:
            alpha = tf.minimum(step / float(self.warmup_steps), 1.0)
            rate = rate * (self.warmup_factor + (1.0 - self.warmup_factor) * alpha)
        return rate

    def get_config(self):
        return {"learning_rate": self.learning_rate, "decay_steps": list(self.decay_steps),
                "decay_factor": self.decay_factor, "warmup_steps": self.warmup_steps,
                "warmup_factor": self.warmup_factor}


class TrainingRecipe(dict):
    """A zoo entry's recipe with the drivers' defaults filled in."""

    DEFAULTS = {"learning_rate": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 8,
                "epochs": 12, "decay_epochs": [8, 11], "decay_factor": 0.1, "warmup_steps": 100,
                "warmup_factor": 0.001, "clipnorm": 10.0, "optimizer": "sgd",
                # The training augmentation (kerasdet.data.pipeline's `augment`): "default" is a
                # horizontal flip; single-shot entries (RefineDet) name the SSD chain, "ssd".
                "augment": "default"}

    def __init__(self, recipe=None, **overrides):
        super().__init__(self.DEFAULTS)
        self.update({k: v for k, v in (recipe or {}).items() if k in self.DEFAULTS})
        self.update({k: v for k, v in overrides.items() if v is not None})


# A recipe's warm-up (e.g. Detectron's 500 iterations of a 90k-iteration run) is capped at this
# fraction of a run's steps, so that a short run on a small data set is not all warm-up.
MAX_WARMUP_FRACTION = 0.1


def adapt_recipe(recipe, steps_per_epoch, *, epochs=None, batch_size=None, learning_rate=None,
                 weight_decay=None, momentum=None, warmup_steps=None, decay_epochs=None):
    """The effective recipe of a run: a zoo entry's ``recipe`` adapted to the run's flags.

    * Batch size: the recipe's ``batch_size`` is the reference. With another batch the learning
      rate scales linearly, lr x batch / recipe batch (Goyal et al. 2017, the rule Detectron uses),
      unless ``learning_rate`` is given.
    * Epochs: decay epochs of the recipe scale with ``epochs`` / recipe epochs (recipe 12 epochs with
      decay at [8, 11] -> 24 epochs decay at [16, 22]) unless ``decay_epochs`` is given.
    * Warm-up: the recipe's steps, at most MAX_WARMUP_FRACTION of the run's steps, unless
      ``warmup_steps`` is given.

    Returns a TrainingRecipe whose extra keys record the reference values and ``changes`` (what was
    adapted and why, one line each), for the printout and run.json.
    """
    base = TrainingRecipe(recipe)
    out = TrainingRecipe(recipe, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                         weight_decay=weight_decay, momentum=momentum, warmup_steps=warmup_steps,
                         decay_epochs=decay_epochs)
    changes = []
    if learning_rate is None and out["batch_size"] != base["batch_size"]:
        out["learning_rate"] = base["learning_rate"] * out["batch_size"] / base["batch_size"]
        changes.append(f"learning rate {out['learning_rate']:.6g} = {base['learning_rate']:g} x "
                       f"{out['batch_size']} / {base['batch_size']} (linear scaling from the recipe's batch)")
    if decay_epochs is None and out["epochs"] != base["epochs"]:
        factor = out["epochs"] / base["epochs"]
        out["decay_epochs"] = [round(e * factor, 4) for e in base["decay_epochs"]]
        changes.append(f"decay epochs {_numbers(out['decay_epochs'])} = recipe's {_numbers(base['decay_epochs'])}"
                       f" x {out['epochs']} / {base['epochs']} epochs")
    total_steps = int(out["epochs"]) * int(steps_per_epoch)
    cap = max(1, math.ceil(MAX_WARMUP_FRACTION * total_steps))
    if warmup_steps is None and out["warmup_steps"] > cap:
        changes.append(f"warm-up {cap} steps (recipe's {out['warmup_steps']}, capped at "
                       f"{MAX_WARMUP_FRACTION:.0%} of the run's {total_steps} steps)")
        out["warmup_steps"] = cap
    out.update(recipe_batch_size=base["batch_size"], recipe_learning_rate=base["learning_rate"],
               recipe_epochs=base["epochs"], steps_per_epoch=int(steps_per_epoch), total_steps=total_steps,
               changes=changes)
    return out


def _numbers(values):
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def format_recipe(recipe):
    """A few lines describing the effective recipe (as `kerasdet train` prints it)."""
    lines = [f"recipe: batch {recipe['batch_size']}, learning rate {recipe['learning_rate']:.6g}, "
             f"{recipe['epochs']} epochs x {recipe.get('steps_per_epoch', '?')} steps, warm-up "
             f"{recipe['warmup_steps']} steps, x{recipe['decay_factor']:g} at epochs "
             f"{_numbers(recipe['decay_epochs'])}, "
             + (f"SGD momentum {recipe['momentum']:g}" if recipe.get("optimizer", "sgd") == "sgd"
                else "Adam")
             + f", weight decay {recipe['weight_decay']:g}, augmentation "
             f"{'flip' if recipe.get('augment', 'default') == 'default' else recipe['augment']}"]
    lines += [f"  adapted: {change}" for change in recipe.get("changes", ())]
    return "\n".join(lines)


def make_optimizer(recipe, steps_per_epoch):
    """SGD with momentum (or Adam, ``"optimizer": "adam"``), decoupled weight decay, warm-up and step
    decay (epochs -> steps)."""
    schedule = WarmupStepSchedule(
        recipe["learning_rate"], [int(e * steps_per_epoch) for e in recipe["decay_epochs"]],
        recipe["decay_factor"], recipe["warmup_steps"], recipe["warmup_factor"])
    if recipe.get("optimizer", "sgd") == "adam":
        # The small synthetic entries whose unnormalized tiny backbone plateaus under SGD
        # (RefineDet's, measured in tests/test_refinedet_learning.py) train with Adam.
        return keras.optimizers.Adam(schedule, weight_decay=recipe["weight_decay"] or None,
                                     clipnorm=recipe["clipnorm"] or None)
    if recipe.get("optimizer", "sgd") != "sgd":
        raise ValueError(f"recipe optimizer must be 'sgd' or 'adam', got {recipe['optimizer']!r}")
    return keras.optimizers.SGD(schedule, momentum=recipe["momentum"],
                                weight_decay=recipe["weight_decay"],
                                clipnorm=recipe["clipnorm"] or None)
