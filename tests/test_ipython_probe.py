"""Beam's IPython check without importing IPython outside an IPython session (`pipelines.ipython_probe`)."""
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import apache_beam.pipeline as beam_pipeline
import apache_beam.utils.interactive_utils as interactive_utils

from pipelines.ipython_probe import install

ROOT = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import apache_beam as beam
    from pipelines.runner import run_pipeline
    out = os.environ["OUT"]

    def build(pipeline):
        pipeline | beam.Create([1, 2, 3]) | beam.Map(lambda v: v * 2) | beam.Map(
            lambda v: open(os.path.join(out, str(v)), "w").close())

    if sys.argv[1] == "ours":
        run_pipeline(build, ["--runner=FnApiRunner"])
    else:  # Beam's own check, as a pipeline built outside run_pipeline makes it
        with beam.Pipeline(argv=["--runner=FnApiRunner"]) as pipeline:
            build(pipeline)
""")


def _run_with_an_ipython_installed(tmp_path: Path, how: str) -> tuple[bool, list[str]]:
    """Run a three-element pipeline in a fresh process that can import a stand-in IPython package (which marks
    being imported); returns (imported, the elements' output files)."""
    fake = tmp_path / how / "site"
    (fake / "IPython").mkdir(parents=True)
    marker = tmp_path / how / "ipython-imported"
    (fake / "IPython" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef get_ipython():\n    return None\n")
    out = tmp_path / how / "out"
    out.mkdir()
    script = tmp_path / how / "run.py"
    script.write_text(RUN.format(root=str(ROOT)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]), "OUT": str(out)}
    subprocess.run([sys.executable, str(script), how], env=env, check=True, timeout=300, capture_output=True)
    return marker.exists(), sorted(os.listdir(out))


def test_a_pipeline_run_by_us_does_not_import_ipython(tmp_path):
    imported, written = _run_with_an_ipython_installed(tmp_path, "ours")
    assert written == ["2", "4", "6"]
    assert not imported
    imported, written = _run_with_an_ipython_installed(tmp_path, "beams")  # the same pipeline, Beam's check
    assert written == ["2", "4", "6"]
    assert imported


def test_inside_ipython_the_answer_is_beams(monkeypatch):
    install()
    assert install()  # idempotent
    for module in (interactive_utils, beam_pipeline):
        assert hasattr(module.is_in_ipython, "beams")
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert interactive_utils.is_in_ipython() is False
    shell = types.SimpleNamespace(config={})
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert interactive_utils.is_in_ipython() is True and beam_pipeline.is_in_ipython() is True
    fake.get_ipython = lambda: None  # IPython imported by some library, but no shell running
    assert interactive_utils.is_in_ipython() is False
