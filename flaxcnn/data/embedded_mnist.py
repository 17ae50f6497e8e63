"""`embedded_mnist`: a 12,000-image real-MNIST subset shipped inside the package.

10,000 stratified images of the official train split and 2,000 of the official test split
(MNIST by LeCun, Cortes and Burges, CC BY-SA 3.0), built by `scripts/build_embedded_mnist.py`.
It is an ordinary tfds dataset: it prepares offline in seconds into any `data_dir`, so the
same input pipeline serves it and every tfds dataset.
"""

import importlib.resources

import numpy as np
import tensorflow_datasets as tfds


class EmbeddedMnist(tfds.core.GeneratorBasedBuilder):
    """Real-MNIST subset that needs no download."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "10,000 train / 2,000 test images, stratified by class."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
            license="CC BY-SA 3.0",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Everything is in the package.
        source = importlib.resources.files("flaxcnn.data") / "embedded_mnist.npz"
        with importlib.resources.as_file(source) as path, np.load(path) as arrays:
            data = {name: arrays[name] for name in arrays.files}
        return {
            "train": self._generate_examples(data["x_train"], data["y_train"]),
            "test": self._generate_examples(data["x_test"], data["y_test"]),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image[:, :, None], "label": int(label)}
