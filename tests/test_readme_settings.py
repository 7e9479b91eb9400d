"""What the README says about settings, against the code that decides them."""

import re
from pathlib import Path

from fixmatch_accel.checkpoint import FIXED_ON_RESUME

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_lists_every_setting_a_resume_cannot_change():
    text = " ".join(README.read_text().split())
    sentence = re.search(r"refused when it cannot change \((.*?)\), kept from", text)
    assert sentence, "the README's resume section moved"
    listed = set(re.findall(r"`--(\w+)`", sentence.group(1)))
    assert listed == set(FIXED_ON_RESUME)


def test_bench_results_name_date_machine_and_commit_not_work_labels():
    results = README.parent / "bench" / "RESULTS.md"
    text = results.read_text()
    assert not re.search(r"(?i)\bsession\b|\bissue\b|\blent\b", text)
    for heading in re.findall(r"^### .*$", text, flags=re.M):  # a measurement: when and where
        assert re.search(r"20\d\d-\d\d-\d\d", heading) and re.search(r"commit [0-9a-f]{7}", heading), heading
