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
