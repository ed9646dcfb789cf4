"""`pipelines.options.BeamOptions`: Beam's options with each view made once, and what a view may not change."""
import pickle

from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions, SetupOptions, StandardOptions,
                                                  TypeOptions)

from pipelines.options import BeamOptions, beam_options


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


def test_pickled_options_carry_no_views_and_still_hide_impersonation():
    options = beam_options(["--runner=FnApiRunner", "--impersonate_service_account=someone@example.com"])
    options.view_as(StandardOptions)
    options.view_as(GoogleCloudOptions)
    assert "_views" in options.__dict__
    restored = pickle.loads(pickle.dumps(options))
    assert "_views" not in restored.__dict__
    assert restored.view_as(StandardOptions).runner == "FnApiRunner"
    assert restored.view_as(GoogleCloudOptions).impersonate_service_account is None  # as Beam's own options do
