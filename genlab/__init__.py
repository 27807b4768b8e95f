import genlab.core  # noqa
