"""The zoo tables of docs/model-table.md are what the survey's recorded results give, and those
results meet the bar: at least 90% of timm's families give a usable anytime segmenter and
classifier, every plain-ViT and Swin-like family among them, every smp model smp builds.

The results come from ``benchmarks/zoo_survey.py --write`` (about 15 minutes); the thorough
``tests/test_zoo_families.py`` re-runs part of it against them.
"""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("zoo_survey_docs", ROOT / "benchmarks" / "zoo_survey.py")
zoo_survey = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo_survey)

ROWS, SUMMARY_LINE = zoo_survey.read_results()

#: plain transformers and Swin-like backbones (the issue's "every plain-ViT and Swin-like family")
TRANSFORMERS = ["vision_transformer", "deit", "beit", "eva", "cait", "xcit", "swin_transformer",
                "swin_transformer_v2", "swin_transformer_v2_cr", "mvitv2", "twins", "hiera", "mambaout", "gemma4_vit"]


def test_the_page_shows_what_the_results_give():
    text = (ROOT / "docs" / "model-table.md").read_text()
    block = text.split(zoo_survey.BEGIN, 1)[1].split(zoo_survey.END, 1)[0]
    assert block == "\n" + zoo_survey.render_markdown(ROWS, SUMMARY_LINE["versions"]), \
        "docs/model-table.md is stale: run `python benchmarks/zoo_survey.py --docs`"


def test_the_results_cover_every_family_and_their_counts_add_up():
    families = json.loads((ROOT / "benchmarks" / "zoo_families.json").read_text())
    for kind in ("segmenter", "classifier"):
        labels = {r["model"].split(":", 1)[0] for r in ROWS if r["kind"] == kind}
        assert labels == set(families), kind
    assert SUMMARY_LINE["summary"] == zoo_survey.summarize(ROWS)
    for row in ROWS:
        if row.get("ok"):
            assert row["exits"] >= 2 and len(row["exit_names"]) == row["exits"] - 1
        elif row.get("built", True):
            assert row["error"]


def test_the_zoo_meets_the_bar():
    summary = zoo_survey.summarize(ROWS)
    assert summary["segmenter"]["share"] >= 0.9 and summary["classifier"]["share"] >= 0.9
    assert summary["smp"]["usable"] == summary["smp"]["of"] >= 50
    usable = {(r["kind"], r["model"].split(":", 1)[0]) for r in ROWS if r.get("ok")}
    for family in TRANSFORMERS:
        assert ("segmenter", family) in usable and ("classifier", family) in usable, family


def test_the_page_says_what_to_do_for_every_family_that_fails():
    text = (ROOT / "docs" / "model-table.md").read_text().split(zoo_survey.BEGIN, 1)[0]
    failing = {r["model"].split(":", 1)[0] for r in ROWS if r["kind"] in ("segmenter", "classifier") and not r["ok"]}
    for family in failing:
        assert f"\n| {family} |" in text, f"{family} fails in the survey; docs/model-table.md does not say what to do"
