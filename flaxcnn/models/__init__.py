"""Models: `config.model` names a built-in module below or any Flax module by import path
(`package.module:Name`, `path/to/file.py:Name`; see flaxcnn.resolver).

What a module must accept: `__call__(x, train: bool)` with `x` (B, H, W, C) float32 in
[0, 1], returning logits (B, num_classes) for classification. A module that declares a
`num_classes` (or, for the generative tasks, `image_shape`) field gets it from the dataset;
one that does not is built without it. A factory function returning a module also works.
"""

import dataclasses
import difflib
import inspect
from typing import Any

from flax import linen as nn

from flaxcnn import resolver
from flaxcnn.models.autoencoder import ConvAutoencoder
from flaxcnn.models.cnn import CNN, SeedCNN
from flaxcnn.models.gan import DCGAN
from flaxcnn.models.resnet import CifarResNet, FastResNet, PreActResNet18, ResNet20, ResNet56
from flaxcnn.models.rnn import RNN
from flaxcnn.models.vae import ConvVAE

MODELS: dict[str, type[nn.Module]] = {
    "SeedCNN": SeedCNN,
    "CNN": CNN,
    "DCGAN": DCGAN,
    "RNN": RNN,
    "ConvAutoencoder": ConvAutoencoder,
    "ConvVAE": ConvVAE,
    "ResNet20": ResNet20,
    "ResNet56": ResNet56,
    "CifarResNet": CifarResNet,
    "PreActResNet18": PreActResNet18,
    "FastResNet": FastResNet,
}
# Arguments the tasks take from the dataset: passed only to modules that declare them.
DATA_ARGUMENTS = ("num_classes", "image_shape")


def resolve_model(spec: str) -> Any:
    """The module class (or factory) `spec` names: a key of MODELS or an import path."""
    target = resolver.resolve("model", spec, MODELS)
    if isinstance(target, type) and issubclass(target, nn.Module):
        return target
    if isinstance(target, nn.Module):
        raise ValueError(f"model {spec!r} is a module instance; name its class instead")
    if not callable(target):
        raise ValueError(f"model {spec!r} is not a flax.linen Module class")
    return target


def argument_names(model: Any) -> set[str] | None:
    """The keyword arguments a module class or factory takes (None: any)."""
    if isinstance(model, type) and dataclasses.is_dataclass(model):
        return {f.name for f in dataclasses.fields(model) if f.init} - {"parent", "name"}
    parameters = inspect.signature(model).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def check_call(name: str) -> None:
    """Raises ValueError (one line) when the module class `name` cannot be called as the
    tasks call it, `module(x, train=...)`, before anything is traced."""
    model = resolve_model(name)
    if not (isinstance(model, type) and issubclass(model, nn.Module)):
        return  # A factory: its module is checked when built.
    parameters = inspect.signature(model.__call__).parameters.values()
    if not any(p.name == "train" or p.kind is p.VAR_KEYWORD for p in parameters):
        raise ValueError(
            f"model {name!r}: __call__ must accept `train: bool` (True in training steps, "
            "False in evaluation), e.g. `def __call__(self, x, train: bool = False)`"
        )


def model_arguments(name: str, kwargs: dict) -> dict:
    """`kwargs` for the module `name`: the dataset's `num_classes` / `image_shape` dropped if
    it does not take them; any other argument it does not take is a one-line ValueError."""
    accepted = argument_names(resolve_model(name))
    if accepted is None:
        return dict(kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k in accepted or k not in DATA_ARGUMENTS}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(accepted), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"model {name!r} takes no argument {unknown[0]!r}{hint} in config.model_kwargs; "
            f"it takes: {', '.join(sorted(accepted)) or 'none'}"
        )
    return kwargs


def create_model(name: str, **kwargs) -> nn.Module:
    """The module `name` (see `resolve_model`) built with keyword arguments from the config;
    the dataset's `num_classes` / `image_shape` only if the module takes them."""
    module = resolve_model(name)(**model_arguments(name, kwargs))
    if not isinstance(module, nn.Module):
        raise ValueError(f"model {name!r} made a {type(module).__name__}, not a Flax module")
    return module
