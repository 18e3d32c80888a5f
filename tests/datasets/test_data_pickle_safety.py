"""A REFER pickle that names any class or function is refused before anything runs."""

from __future__ import annotations

import pickle

import pytest

from lads.datasets import load_records
from lads.datasets.refer import read_pickle
from lads.errors import LadsError

SIDE_EFFECTS = []


class AppendsOnLoad:
    def __reduce__(self):
        return SIDE_EFFECTS.append, ("ran",)


class TouchesFileOnLoad:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_with_a_callable_is_refused(tmp_path, refer_dir, protocol):
    marker = tmp_path / "touched"
    payload = [{"ref_id": 1, "sentences": [], "x": AppendsOnLoad(), "y": TouchesFileOnLoad(str(marker))}]
    (refer_dir / "refs(unc).p").write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(LadsError, match=r"refs\(unc\)\.p: refusing to load a pickle that names"):
        load_records(refer_dir, "train")
    assert SIDE_EFFECTS == [] and not marker.exists()


def test_os_system_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    # protocol 0 by hand: os.system("touch <marker>")
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(LadsError, match=r"refs\(unc\)\.p.*\(os\.system\)"):
        read_pickle(path)
    assert not marker.exists()


def test_python3_bytes_pickle_is_refused(tmp_path):
    """Python 3 writes bytes at protocol 2 through ``_codecs.encode``: not what Python 2 wrote."""
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{b"sent": b"left"}], protocol=2))
    with pytest.raises(LadsError, match=r"_codecs\.encode"):
        read_pickle(path)


def test_plain_python3_pickle_is_accepted(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"sent": "left", "ids": (1, 2)}], protocol=4))
    assert read_pickle(path) == [{"sent": "left", "ids": [1, 2]}]
