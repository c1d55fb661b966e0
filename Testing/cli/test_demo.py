"""`himatchad demo`: a newcomer's first run shows the whole path on a lesion the features separate."""

from __future__ import annotations

import re
from pathlib import Path

from HiMatchADLib.cli.main import main
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.evaluation.phantom import DEMO_LESION, make_phantom


def test_demo_lesion_is_the_documented_one():
    img, mask = make_phantom((24, 96, 96), seed=1000, lesion=True, **DEMO_LESION)
    small, small_mask = make_phantom((24, 96, 96), seed=1000, lesion=True)
    assert mask.sum() > 3 * small_mask.sum()  # larger than the test phantoms' default lesion
    inside = img.array[mask > 0].mean()
    assert inside > 1.5 * img.array[(small_mask == 0) & (mask == 0) & (img.array > 400)].mean()  # bright


def test_demo_runs_the_whole_path_and_reports_against_the_mask(tiny_model, cache_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["--quiet", "demo", "--out-dir", str(out), "--model", tiny_model, "--cache-dir", str(cache_dir)])
    text = capsys.readouterr().out
    assert code == 0
    query = read_image(out / "data" / "query.nii.gz")
    for name in ("query_heatmap.nii.gz", "query_labelmap.nii.gz"):
        written = read_image(out / name)
        assert written.geometry.same_as(query.geometry) and written.array.shape == query.array.shape
    auroc = float(re.search(r"heatmap AUROC ([0-9.]+)", text).group(1))
    dice = float(re.search(r"Dice of the Anomaly labelmap ([0-9.]+)", text).group(1))
    assert auroc > 0.9, text  # even untrained features separate the demo lesion
    assert dice > 0.1, text
    assert "lesion found: yes" in text
    shown = re.search(r"look at the result: (\S+_overview\.png)", text).group(1)
    assert Path(shown) == out / "query_overview.png" and Path(shown).read_bytes()[:4] == b"\x89PNG"
    # an explicit --model is the user's own: no claim about stand-in features
    assert "untrained features still separate" not in text
