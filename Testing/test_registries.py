"""One contract test over every registered method, engine and output writer (as scikit-learn's
``parametrize_with_checks``): what the registries promise, checked for each entry, and every list
of choices (command line, worker, evaluation) read from them."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import RESOLUTION

from HiMatchADLib import HiMatchADError, HiMatchDetector
from HiMatchADLib.batch import get_engine, list_engines
from HiMatchADLib.methods import MethodSpec, SliceScores, get_method, list_methods
from HiMatchADLib.methods.base import Scorer
from HiMatchADLib.outputs import check_outputs, get_writer, list_writers, output_paths


def _choices(parser, command: str, option: str) -> list:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return list(next(a for a in sub._actions if option in a.option_strings).choices)


def test_the_lists_of_choices_are_the_registries():
    from HiMatchADLib.cli import build_parser
    from HiMatchADLib.evaluation.records import DETECTOR_METHODS

    p = build_parser()
    assert _choices(p, "detect", "--method") == list(list_methods()) == list(DETECTOR_METHODS)
    assert _choices(p, "batch", "--engine") == list(list_engines())
    assert set(list_methods()) >= {"himatch", "knn", "dpmm"} and set(list_engines()) >= {"local", "ray"}
    assert set(list_writers()) >= {"dicom_seg", "dicom_heatmap"}


@pytest.mark.parametrize("name", list_methods())
def test_every_method_fits_scores_and_calibrates(name, fitted, lesion_case):
    spec = get_method(name)
    assert isinstance(spec, MethodSpec) and spec.name == name and get_method(name.upper()) is spec
    assert spec.title and spec.reference
    det = fitted(name)
    assert isinstance(det.scorer, Scorer)
    assert det.calibration["key"]["method"] == name
    keys = set(det.method_key())
    assert set(spec.key_settings(det)) <= keys  # what changes its scores keys its calibration
    assert ("knn_index" in det.settings()) == spec.uses_knn_index
    res = det.predict(lesion_case[0])
    assert res.method == name and res.heatmap.shape == lesion_case[0].array.shape
    scored = np.isfinite(res.slice_scores)
    assert scored.any() and np.isfinite(res.volume_score)
    assert np.all(res.heatmap[~res.foreground] == 0)
    # the scorer's own protocol: one SliceScores per query, a score per foreground patch
    prep = det.prepare(lesion_case[0]).prep
    queries, _ = det._queries(prep, prep.slices_with_foreground()[:2])
    out = det.scorer.score(queries)
    assert len(out) == len(queries) and all(isinstance(s, SliceScores) for s in out)
    assert all(s.patch.shape == (q.tokens[-1].shape[0],) and np.isfinite(s.patch).all() for s, q in zip(out, queries))


def test_an_unknown_method_is_refused_with_the_registered_choices(tiny_model):
    with pytest.raises(HiMatchADError, match="unknown method 'nope'; choose one of " + ", ".join(list_methods())):
        HiMatchDetector(model=tiny_model, method="nope", resolution=RESOLUTION)


@pytest.mark.parametrize("name", list_engines())
def test_every_engine_loads_and_checks_its_requirements(name):
    engine = get_engine(name)
    assert engine.name == name and engine.title
    needs = {"ray": "ray"}.get(name)
    if needs and importlib.util.find_spec(needs) is None:
        with pytest.raises(HiMatchADError):
            engine.check()
        return
    engine.check()
    assert callable(engine.load())


def test_an_unknown_engine_is_refused(tmp_path, fitted):
    from HiMatchADLib.batch import run_batch

    with pytest.raises(HiMatchADError, match="unknown engine 'spark'; choose one of " + ", ".join(list_engines())):
        run_batch(fitted("knn"), tmp_path, tmp_path / "out", engine="spark")


@pytest.mark.parametrize("name", list_writers())
def test_every_output_writer_has_a_path_and_a_writer(name, tmp_path):
    writer = get_writer(name)
    assert writer.name == name and writer.title and writer.suffix.startswith("_")
    paths = output_paths(tmp_path, "case", False, outputs=[name])
    assert paths[name] == tmp_path / f"case{writer.suffix}"
    assert check_outputs([name, name]) == (name,)
    if importlib.util.find_spec("highdicom") is not None or writer.needs != "dicom":
        assert callable(writer.load())


def test_output_suffixes_are_distinct_and_unknown_outputs_are_refused():
    suffixes = [get_writer(n).suffix for n in list_writers()]
    assert len(set(suffixes)) == len(suffixes)
    assert not set(suffixes) & {"_heatmap.nii.gz", "_labelmap.nii.gz", "_scores.json", "_overlay.png"}
    with pytest.raises(HiMatchADError, match="unknown output 'dicom_sr'"):
        check_outputs(["dicom_sr"])
    with pytest.raises(HiMatchADError):
        check_outputs([7])


def test_the_worker_reads_outputs_by_name_and_the_protocol_1_booleans():
    from HiMatchADLib.worker.protocol import requested_outputs

    assert requested_outputs({"dicom_heatmap": True}) == ("dicom_heatmap",)
    assert requested_outputs({"outputs": ["dicom_heatmap", "dicom_seg"], "dicom_seg": True}) == ("dicom_seg", "dicom_heatmap")
    assert requested_outputs({}) == ()
    with pytest.raises(HiMatchADError):
        requested_outputs({"outputs": "dicom_seg"})


def test_the_worker_refuses_unknown_outputs_before_making_a_detector(tmp_path):
    from HiMatchADLib.worker.server import Worker

    made = []
    events = []
    w = Worker(events.append, detector_factory=lambda **kw: made.append(kw))
    for cmd in ("detect", "batch"):
        w.handle({"id": cmd, "cmd": cmd, "input": str(tmp_path), "input_dir": str(tmp_path), "normals": str(tmp_path),
                  "out_dir": str(tmp_path / "o"), "outputs": ["dicom_sr"]})
    assert [e["event"] for e in events] == ["error", "error"] and not made
    assert all("unknown output 'dicom_sr'" in e["message"] and not e.get("internal") for e in events)
