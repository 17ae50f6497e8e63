"""flaxcnn: train image models the functional JAX way.

    flaxcnn.fit(model, dataset, workdir, **settings) -> results   (flaxcnn.api)
    flaxcnn.load_run(workdir) -> Run                              (flaxcnn.inference)

Both load on first use, so `import flaxcnn` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["fit", "load_run", "make_config"]


def __getattr__(name: str):
    if name in __all__:
        from flaxcnn import api

        return getattr(api, name)
    raise AttributeError(f"module 'flaxcnn' has no attribute {name!r}")
