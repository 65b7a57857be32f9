"""Keras factories for the Keras tests, as the user's files would hold them (imported by fedgap from a path)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED_STYLE = f"{REPO}/examples/keras_mobilenet.py:build"  # the seed's network, Keras defaults (issue 23, item 5)

FACTORIES = '''
import keras
from keras import layers


def small(num_classes, in_channels, image_size, dropout=0.0):
    """conv -> BN -> ReLU -> (dropout) -> pool -> dense softmax: the smallest model with every case."""
    inputs = keras.Input(shape=(*image_size, in_channels))
    x = layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(num_classes, activation="softmax")(x))


def sequential(num_classes, in_channels, image_size):
    """A Sequential model ending in a Softmax layer."""
    return keras.Sequential([
        keras.Input(shape=(*image_size, in_channels)),
        layers.Conv2D(4, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.GlobalAveragePooling2D(), layers.Dense(num_classes), layers.Softmax(),
    ])


def logits(num_classes, in_channels, image_size):
    inputs = keras.Input(shape=(*image_size, in_channels))
    x = layers.Flatten()(inputs)
    return keras.Model(inputs, layers.Dense(num_classes)(x))


def any_layout(num_classes, in_channels, image_size):
    """Built for keras.config.image_data_format(), whichever it is."""
    first = keras.config.image_data_format() == "channels_first"
    inputs = keras.Input(shape=(in_channels, *image_size) if first else (*image_size, in_channels))
    x = layers.Conv2D(2, 3, padding="same")(inputs)
    return keras.Model(inputs, layers.Dense(num_classes)(layers.GlobalAveragePooling2D()(x)))


def raises(num_classes, in_channels, image_size):
    raise RuntimeError("weights missing")


def layer_only(num_classes, in_channels, image_size):
    return layers.Dense(num_classes)


def text(num_classes, in_channels, image_size):
    return "a model"


def stateful(num_classes, in_channels, image_size):
    inputs = keras.Input(shape=(*image_size, in_channels), batch_size=2)
    x = layers.Reshape((image_size[0], image_size[1] * in_channels))(inputs)
    x = layers.SimpleRNN(4, stateful=True)(x)
    return keras.Model(inputs, layers.Dense(num_classes)(x))


def regularized(num_classes, in_channels, image_size):
    inputs = keras.Input(shape=(*image_size, in_channels))
    x = layers.Flatten()(inputs)
    return keras.Model(inputs, layers.Dense(num_classes, kernel_regularizer="l2")(x))


def rgb32(num_classes, in_channels, image_size):
    inputs = keras.Input(shape=(32, 32, 3))
    x = layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, layers.Dense(num_classes)(x))


def two_inputs(num_classes, in_channels, image_size):
    a, b = keras.Input(shape=(*image_size, in_channels)), keras.Input(shape=(*image_size, in_channels))
    x = layers.Flatten()(layers.Add()([a, b]))
    return keras.Model([a, b], layers.Dense(num_classes)(x))


class Probabilities(keras.Model):
    def __init__(self, num_classes):
        super().__init__()
        self.dense = layers.Dense(num_classes)
        self.flatten = layers.Flatten()

    def call(self, x):
        return keras.ops.softmax(self.dense(self.flatten(x)))


def probabilities(num_classes, in_channels, image_size):
    return Probabilities(num_classes)
'''


def factories(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keras_models") / "keras_nets.py"
    path.write_text(FACTORIES)
    return path
