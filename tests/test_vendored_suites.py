"""The vendored third-party suites run only against the library release they were taken from, and say so."""

import pytest

from vendored_suites import VENDOR, version_mismatches


def test_installed_libraries_match_the_vendored_suites():
    if not VENDOR.is_dir():
        pytest.skip(f"third-party test suites not found at {VENDOR}")
    mismatches = version_mismatches()
    if mismatches:
        pytest.fail("\n".join(mismatches.values()), pytrace=False)


def test_a_mismatch_names_both_versions_and_the_way_out(tmp_path):
    suite = tmp_path / "transformers-tests"
    suite.mkdir()
    (suite / "README.md").write_text("Files from the transformers **5.24.0** source distribution, unchanged.\n")

    mismatches = version_mismatches(tmp_path, installed={"transformers": "5.99.1"})

    assert list(mismatches) == ["test_transformers_common.py"]
    message = mismatches["test_transformers_common.py"]
    assert "transformers 5.99.1 is installed" in message and "transformers 5.24.0's" in message
    assert "tests/constraints.txt" in message and "\n" not in message


def test_the_matching_release_is_no_mismatch(tmp_path):
    suite = tmp_path / "peft-tests"
    suite.mkdir()
    (suite / "README.md").write_text("`testing_common.py`, unchanged from the peft **0.21.2** source distribution.\n")

    assert version_mismatches(tmp_path, installed={"peft": "0.21.2"}) == {}


def test_a_readme_without_a_release_is_refused(tmp_path):
    suite = tmp_path / "peft-tests"
    suite.mkdir()
    (suite / "README.md").write_text("peft's tests, some version\n")

    with pytest.raises(ValueError, match="no release named"):
        version_mismatches(tmp_path, installed={"peft": "0.21.2"})
