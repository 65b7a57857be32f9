"""A MobileNet-like classifier written the way a Keras user writes it (issue 23, item 5): Keras' functional API,
Keras' defaults untouched (BatchNormalization momentum 0.99, epsilon 1e-3; 'same' padding), a final softmax.

    fedgap run model.name=examples/keras_mobilenet.py:build --out runs/keras
    fedgap doctor model.name=examples/keras_mobilenet.py:build --out runs/keras-doctor
    fedgap run model.name=examples/keras_mobilenet.py:build model.kwargs.use_groupnorm=true --out runs/keras-gn

fedgap calls build(num_classes, in_channels, image_size, **model.kwargs) and runs the model on PyTorch (Keras'
torch backend); see docs/keras.md.
"""

import keras
from keras import layers


def build(num_classes, in_channels, image_size, use_groupnorm=False, groups=8):
    def norm():
        return layers.GroupNormalization(groups=groups) if use_groupnorm else layers.BatchNormalization()

    def separable(x, filters, strides):
        x = layers.DepthwiseConv2D((3, 3), strides=strides, padding="same")(x)
        x = norm()(x)
        x = layers.ReLU()(x)
        x = layers.Conv2D(filters, (1, 1), padding="same")(x)
        x = norm()(x)
        return layers.ReLU()(x)

    inputs = keras.Input(shape=(*image_size, in_channels))
    x = layers.Conv2D(32, (3, 3), strides=2, padding="same")(inputs)
    x = norm()(x)
    x = layers.ReLU()(x)
    x = separable(x, 64, 1)
    x = separable(x, 128, 2)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)
