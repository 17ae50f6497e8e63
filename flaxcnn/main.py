"""`python -m flaxcnn.main --workdir DIR [--config FILE] [--config.key=value]`: train."""

from flaxcnn.cli.train import run

if __name__ == "__main__":
    run()
