import sys
from pathlib import Path

# Make tests/helpers.py importable as `helpers` from every test module.
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small prepared slice of the demo corpus (512-token BPE), shared by the training tests."""
    from helpers import hymoe

    out = tmp_path_factory.mktemp("data") / "demo"
    r = hymoe("data", "demo", "--output", str(out), "--vocab", "512", "--max-bytes", "400000")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def valid_data(demo_data, tmp_path_factory):
    """Held-out demo documents (standard-library files `demo_data` leaves out), prepared with its
    tokenizer: the validation set of the training tests."""
    from hymoe.data.prepare import prepare_demo_valid

    out = tmp_path_factory.mktemp("data") / "valid"
    prepare_demo_valid(out, demo_data / "tokenizer.json", 400_000, 100_000, progress=False)
    return out
