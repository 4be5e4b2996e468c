"""Benchmarks (bench_*.py) and the research product: privacy–utility studies (``from simulations import Study``)."""


def __getattr__(name):
    if name in ("Study", "StudyError"):
        from simulations import study

        return getattr(study, name)
    raise AttributeError(name)
