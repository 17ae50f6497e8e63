"""`python -m flaxcnn COMMAND ...`: the `flaxcnn` console command (train, evaluate, predict,
export, sample, scorer)."""

from flaxcnn.cli import main

if __name__ == "__main__":
    main()
