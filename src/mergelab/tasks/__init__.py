"""One module per entry script; each defines ``run(ctx) -> results dict`` (see :mod:`mergelab.runner`)."""
