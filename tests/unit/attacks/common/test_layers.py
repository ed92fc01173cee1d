"""The one lookup of a model's first and last linear layers."""

from __future__ import annotations

import dataclasses

from attacks.common.layers import final_layer, first_linear, image_layer
from simulator.core.models import model_spec


def test_the_first_linear_layer_of_an_mlp_and_why_a_cnn_has_none() -> None:
    layer = first_linear(model_spec("mlp", widths=(16,)))
    assert not isinstance(layer, str)
    assert (layer.module, layer.weight, layer.bias, layer.in_features) == (
        "1", "1.weight", "1.bias", 784,
    )  # fmt: skip
    assert image_layer(model_spec("mlp", widths=(16,))) == layer
    reason = first_linear(model_spec("cnn", channels=(4,)))
    assert reason == "first layer '0' is a convolution, not fully connected"
    assert (
        image_layer(model_spec("lenet"))
        == "first layer 'body.0' is a convolution, not fully connected"
    )


def test_parameter_free_layers_in_front_are_passed_over() -> None:
    centred = first_linear(model_spec("mlp", widths=(16,), centre_inputs=True))
    assert not isinstance(centred, str) and centred.weight == "2.weight"
    imprinted = first_linear(dataclasses.replace(model_spec("mlp", widths=(16,)), imprint_bins=8))
    assert not isinstance(imprinted, str) and imprinted.weight == "imprint.encoder.weight"


def test_the_image_layer_needs_a_bias() -> None:
    no_bias = model_spec("mlp", widths=(16,), bias=False)
    layer = first_linear(no_bias)
    assert not isinstance(layer, str) and layer.bias is None
    assert image_layer(no_bias) == "first layer '1' has no bias: dW[i] / db[i] is undefined"


def test_the_final_layer_maps_onto_the_classes() -> None:
    head = final_layer(model_spec("mlp", widths=(16,)))
    assert head is not None and (head.weight, head.bias) == ("3.weight", "3.bias")
    lenet = final_layer(model_spec("lenet"))
    assert lenet is not None and (lenet.module, lenet.weight) == ("head", "head.weight")
    assert final_layer(model_spec("mlp", widths=(16,), bias=False)).bias is None  # type: ignore[union-attr]
