"""Test-time augmentation: a classifier evaluated on several views of each image.

In evaluation (`train=False`) the wrapped classifier's logits are averaged over the image,
its mirror image (`flip`) and copies shifted by `shift` pixels up, down, left and right
(zeros enter at the edge), the shifted copies of the mirror image too. Training calls the
classifier unchanged. The wrapper shares the classifier's scope, so parameters, batch
statistics and checkpoints are the classifier's own, and evaluation, predict and export
(which all call the model with `train=False`) see the same views.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn


def views(x: jax.Array, flip: bool, shift: int) -> list[jax.Array]:
    """The images `x` (B, H, W, C) and their test-time views, in a fixed order."""
    images = [x, x[:, :, ::-1]] if flip else [x]
    if shift <= 0:
        return images
    s = shift
    height, width = x.shape[1:3]
    out = list(images)
    for image in images:
        padded = jnp.pad(image, ((0, 0), (s, s), (s, s), (0, 0)))
        for dy, dx in ((s, 0), (-s, 0), (0, s), (0, -s)):  # Down, up, right, left.
            out.append(padded[:, s - dy : s - dy + height, s - dx : s - dx + width])
    return out


class ViewAveraged(nn.Module):
    """`classifier`, whose evaluation averages its logits over `views(x, flip, shift)`."""

    classifier: nn.Module
    flip: bool = False
    shift: int = 0

    def setup(self):
        nn.share_scope(self, self.classifier)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if train:
            return self.classifier(x, train=True)
        images = views(x, self.flip, self.shift)
        logits = self.classifier(jnp.concatenate(images), train=False)
        return jnp.mean(logits.reshape(len(images), x.shape[0], -1), axis=0)
