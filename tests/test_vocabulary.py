"""The torch-free names (fastcnn.vocabulary) that the CLI offers before it imports torch name exactly what the
registries behind them hold, and the two implementations' old names translate to the new ones."""

import pytest

from fastcnn import vocabulary
from fastcnn.vocabulary import canonical_kernel


def registries():
    from fastcnn.config import AMP_DTYPES, COMPILE_MODES, DEVICES, OPTIMIZERS, PRESETS
    from fastcnn.data import DATASETS, LOADERS
    from fastcnn.data.image_shape import CHANNEL_CHOICES
    from fastcnn.engine import SCHEDULES
    from fastcnn.models import MODELS
    from fastcnn.recipes import RECIPES

    return {
        "MODEL_NAMES": tuple(sorted(MODELS)), "RECIPE_NAMES": tuple(sorted(RECIPES)), "DATASETS": tuple(DATASETS),
        "LOADERS": tuple(LOADERS), "CHANNEL_CHOICES": tuple(CHANNEL_CHOICES), "PRESETS": tuple(PRESETS),
        "OPTIMIZERS": tuple(OPTIMIZERS), "SCHEDULES": tuple(SCHEDULES), "DEVICES": tuple(DEVICES),
        "AMP_DTYPE_NAMES": tuple(sorted(AMP_DTYPES)), "COMPILE_MODES": tuple(COMPILE_MODES),
    }


@pytest.mark.parametrize("name", list(registries()))
def test_each_torch_free_list_equals_its_registry(name):
    assert getattr(vocabulary, name) == registries()[name]


def test_predict_uses_the_vocabularys_choices():
    from fastcnn import predict

    assert predict.FIT_CHOICES is vocabulary.FIT_CHOICES and predict.INVERT_CHOICES is vocabulary.INVERT_CHOICES


@pytest.mark.parametrize("given, meant", [("auto", "auto"), ("fused", "fused"), ("aten", "aten"),
                                          ("triton", "fused"), ("torch", "aten")])
def test_kernel_names_old_and_new(given, meant):
    assert canonical_kernel(given) == meant


@pytest.mark.parametrize("wrong", ["cudnn", "Fused", "", "native"])
def test_an_unknown_kernel_name_lists_every_accepted_one(wrong):
    with pytest.raises(ValueError, match="auto, fused, aten, triton, torch"):
        canonical_kernel(wrong)
