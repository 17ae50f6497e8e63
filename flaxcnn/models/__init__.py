"""Model registry: `config.model` names to Flax modules."""

from flax import linen as nn

from flaxcnn.models.autoencoder import ConvAutoencoder
from flaxcnn.models.cnn import CNN, SeedCNN
from flaxcnn.models.gan import DCGAN
from flaxcnn.models.rnn import RNN
from flaxcnn.models.vae import ConvVAE

MODELS: dict[str, type[nn.Module]] = {
    "SeedCNN": SeedCNN,
    "CNN": CNN,
    "DCGAN": DCGAN,
    "RNN": RNN,
    "ConvAutoencoder": ConvAutoencoder,
    "ConvVAE": ConvVAE,
}


def create_model(name: str, **kwargs) -> nn.Module:
    """Instantiates the registered model `name` with keyword arguments from the config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
