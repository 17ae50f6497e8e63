"""A recurrent classifier that reads an image one row at a time."""

import jax
from flax import linen as nn

CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


class RNN(nn.Module):
    """Each image row is one time step (28 steps of 28 * C features on MNIST); an LSTM or GRU
    runs over the rows and a dense layer classifies its final hidden state. Returns logits.
    """

    num_classes: int = 10
    hidden_size: int = 128
    cell: str = "lstm"  # "lstm" (nn.OptimizedLSTMCell) or "gru" (nn.GRUCell).

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # No dropout or batch norm here.
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; valid: {', '.join(sorted(CELLS))}")
        batch, height, width, channels = x.shape
        rows = x.reshape(batch, height, width * channels)
        outputs = nn.RNN(CELLS[self.cell](self.hidden_size))(rows)
        return nn.Dense(self.num_classes)(outputs[:, -1])
