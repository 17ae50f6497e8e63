"""The runner: the training loop every task shares (`loop`), the steps it compiles (`steps`)
and the work it does at every epoch's end (`hooks`)."""
