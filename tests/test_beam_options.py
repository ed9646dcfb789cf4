"""`pipelines.options.BeamOptions`: Beam's options with each view made once, and what a view may not change."""
import pickle

from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions, SetupOptions, StandardOptions,
                                                  TypeOptions)

import pytest

from pipelines.options import ENVIRONMENT_CACHE_MS, BeamOptions, beam_options


def test_a_view_is_made_once_and_shares_the_options_values():
    options = beam_options(["--runner=FnApiRunner", "--no_pipeline_type_check"])
    assert isinstance(options, BeamOptions)
    standard = options.view_as(StandardOptions)
    assert options.view_as(StandardOptions) is standard and standard.runner == "FnApiRunner"
    assert options.view_as(TypeOptions).pipeline_type_check is False
    options.view_as(SetupOptions).save_main_session = True  # written through one view, read through others
    assert options.view_as(SetupOptions).save_main_session is True
    assert options.get_all_options()["save_main_session"] is True
    fresh = PipelineOptions(["--runner=FnApiRunner", "--no_pipeline_type_check"])
    assert {k: v for k, v in fresh.get_all_options().items() if k != "save_main_session"} == \
        {k: v for k, v in options.get_all_options().items() if k != "save_main_session"}


@pytest.mark.parametrize("args, kept_ms", [
    (["--runner=PortableRunner", "--job_endpoint=localhost:8099"], ENVIRONMENT_CACHE_MS),
    (["--runner", "FlinkRunner", "--flink_master=[local]"], ENVIRONMENT_CACHE_MS),
    (["--runner=apache_beam.runners.portability.spark_runner.SparkRunner"], ENVIRONMENT_CACHE_MS),
    (["--runner=SparkRunner", "--environment_cache_millis=5000"], 5000),  # the user's own value is kept
    (["--runner=FnApiRunner"], 0),  # in-process workers: nothing to keep
    ([], 0),
])
def test_job_server_runners_keep_their_sdk_workers_between_stages(args, kept_ms):
    """Without it Flink's and Spark's job servers start an SDK worker per stage, which loads the backbone and the
    gallery again each time (tests/test_clusters.py asserts the started workers stay few on a real cluster)."""
    assert int(beam_options(args).get_all_options()["environment_cache_millis"]) == kept_ms


def test_pickled_options_carry_no_views_and_still_hide_impersonation():
    options = beam_options(["--runner=FnApiRunner", "--impersonate_service_account=someone@example.com"])
    options.view_as(StandardOptions)
    options.view_as(GoogleCloudOptions)
    assert "_views" in options.__dict__
    restored = pickle.loads(pickle.dumps(options))
    assert "_views" not in restored.__dict__
    assert restored.view_as(StandardOptions).runner == "FnApiRunner"
    assert restored.view_as(GoogleCloudOptions).impersonate_service_account is None  # as Beam's own options do


def test_kept_signatures_are_beams_per_function_and_stateful_dofns_keep_their_state():
    """`pipelines.signatures`: a bound method's signature is read once per function, equal to Beam's own; other
    callables are read as before; a stateful DoFn's state spec is still found once it is installed."""
    import inspect

    import apache_beam as beam
    import apache_beam.transforms.core as core
    from apache_beam.coders import VarIntCoder
    from apache_beam.transforms import userstate

    from pipelines import signatures

    class Counting(beam.DoFn):
        SEEN = userstate.BagStateSpec("seen", VarIntCoder())

        def process(self, element, seen=beam.DoFn.StateParam(SEEN), size: int = 3):
            yield element

    first, second = Counting(), Counting()
    for name in ("process", "setup", "display_data"):
        kept = signatures.kept_signature(getattr(first, name))
        assert kept == inspect.signature(getattr(first, name))
        assert signatures.kept_signature(getattr(second, name)) is kept   # another object, the same function
    lam = lambda x, y=2: x  # noqa: E731
    assert signatures.kept_signature(lam) == inspect.signature(lam)
    assert lam not in signatures._KEPT
    try:
        assert signatures.install() and core.get_signature is signatures.kept_signature
        states, timers = userstate.get_dofn_specs(Counting())
        assert states == {Counting.SEEN} and timers == set()
        args, defaults = core.get_function_args_defaults(first.process)
        assert args == ["element", "seen", "size"] and defaults[1] == 3 and defaults[0].state_spec is Counting.SEEN
    finally:
        core.get_signature = signatures._BEAMS
