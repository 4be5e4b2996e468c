"""Beam options of the pipeline's Beam-based components (``privtrain run --beam-arg=...``, docs/scaling.md).

The default is Beam's DirectRunner in one process (measured against multi-processing on full Adult: see
docs/scaling.md). Options given with ``--beam-arg`` are checked here (one clear line for an obviously bad
value) and passed through to TFX's ``beam_pipeline_args``: Beam itself reads them in every Beam component."""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

# Beam's in-process direct runner. TFX builds an sdist of itself for remote Beam workers unless a
# dependency flag is set; in-process workers already import it, so name the (unused) container image.
DEFAULT_BEAM_ARGS = ("--direct_running_mode=in_memory", "--direct_num_workers=1",
                     "--sdk_container_image=unused-by-the-in-process-direct-runner")
RUNNERS = ("DirectRunner", "PortableRunner", "FlinkRunner", "SparkRunner", "DataflowRunner", "PrismRunner")
DIRECT_MODES = ("in_memory", "multi_threading", "multi_processing")


class BeamArgError(ValueError):
    """A --beam-arg value that cannot work; the message names it and the fix."""


def _split(arg: str) -> Tuple[str, str]:
    name, _, value = arg.partition("=")
    return name, value


def _unknown_options(args: Sequence[str]) -> List[str]:
    """The options no Beam PipelineOptions class declares, parsed as Beam parses them; raises BeamArgError when
    Beam's parser rejects a value (e.g. a number that is not one)."""
    import contextlib
    import io

    from apache_beam.options import pipeline_options

    parser = pipeline_options._BeamArgumentParser()
    for cls in {str(c): c for c in pipeline_options.PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # as PipelineOptions.get_all_options does
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            _, unknown = parser.parse_known_args(list(args))
    except SystemExit:
        message = errors.getvalue().strip().splitlines()[-1:] or ["invalid value"]
        raise BeamArgError(f"--beam-arg: Beam rejects {' '.join(args)}: {message[0].split(': error: ')[-1]}") from None
    return [u for u in unknown if u.startswith("--")]


def validate(args: Sequence[str]) -> List[str]:
    """Checks user Beam options; returns them unchanged. Raises BeamArgError (one line) on a bad one."""
    for arg in args:
        if not arg.startswith("--") or len(arg) < 3:
            raise BeamArgError(f"--beam-arg {arg!r} is not a Beam option: write it as --beam-arg=--NAME=VALUE "
                               "(e.g. --beam-arg=--direct_running_mode=multi_processing)")
        name, value = _split(arg)
        if name == "--runner":
            short = value.rsplit(".", 1)[-1]
            if short not in RUNNERS:
                raise BeamArgError(f"--beam-arg {arg!r}: unknown Beam runner {value!r}; use one of "
                                   f"{', '.join(RUNNERS)}")
        elif name == "--direct_running_mode" and value not in DIRECT_MODES:
            raise BeamArgError(f"--beam-arg {arg!r}: the direct runner's mode is one of {', '.join(DIRECT_MODES)}")
        elif name == "--direct_num_workers" and not (value.isdigit() and int(value) >= 1):
            raise BeamArgError(f"--beam-arg {arg!r}: the number of direct-runner workers must be an integer >= 1")
    unknown = _unknown_options(args)
    if unknown:
        raise BeamArgError(f"--beam-arg {unknown[0]!r}: Beam has no such option; docs/scaling.md lists the options "
                           "of each runner")
    return list(args)


def runner_of(args: Iterable[str]) -> str:
    runner = "DirectRunner"
    for arg in args:
        name, value = _split(arg)
        if name == "--runner":
            runner = value.rsplit(".", 1)[-1]
    return runner


def beam_pipeline_args(user_args: Sequence[str] = ()) -> List[str]:
    """The pipeline's beam_pipeline_args: the in-process defaults (direct runner only), then the user's options,
    which win (Beam's argument parser keeps the last value of an option)."""
    user_args = list(user_args)
    if runner_of(user_args) != "DirectRunner":
        return user_args  # a remote runner: its workers need a real environment (docs/scaling.md)
    return list(DEFAULT_BEAM_ARGS) + user_args
