"""Model registry: `config.model` names to Flax modules."""

from flax import linen as nn

from flaxcnn.models.cnn import CNN, SeedCNN

MODELS: dict[str, type[nn.Module]] = {"SeedCNN": SeedCNN, "CNN": CNN}


def create_model(name: str, **kwargs) -> nn.Module:
    """Instantiates the registered model `name` with keyword arguments from the config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
