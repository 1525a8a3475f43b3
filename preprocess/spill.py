"""A clip row held on disk: how a shard writer waits for every clip of a long video in memory bounded by a clip.

A writer holds a video's rows until its last clip has arrived (the per-video stages need them all), so it would
otherwise hold every clip of a long video at once. A :class:`SpilledRow` keeps a row's light values (keys, scalars,
short arrays) in memory and appends each heavy one (the clip's MP4s, reference JPEGs, per-frame arrays of more than
``SPILL_MIN_BYTES``) to one file per clip in the writer's staging directory; reading a heavy value reads it back from
that file, every time (nothing is cached). A video then costs the writer its rows' light values (~2 kB a clip), and
a video stage that looks at one clip at a time holds one clip.

The files are scratch, named ``*.spill.tmp``: deleted once their clip is in the tar (or failed), and by a rerun
otherwise (``state.load_committed`` deletes ``_staging/*.tmp``); nothing committed depends on them.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, NamedTuple

import numpy as np

SPILL_MIN_BYTES = 1024  # a longer bytes value or array goes to disk (a 121-frame clip's (T,) float32 stays)
SPILL_SUFFIX = ".spill.tmp"


class _OnDisk(NamedTuple):
    offset: int
    length: int


def is_heavy(value: Any) -> bool:
    """Whether a row value is held on disk: bytes or an array longer than ``SPILL_MIN_BYTES``."""
    if isinstance(value, np.ndarray):
        return value.nbytes > SPILL_MIN_BYTES
    return isinstance(value, (bytes, bytearray)) and len(value) > SPILL_MIN_BYTES


class SpilledRow(MutableMapping):
    """A row (a mapping of column → value, in the row's order) whose heavy values live in the file ``path``.

    Setting a heavy value appends it to the file (created on the first one); light arrays are copied, so that a row
    received from Ray (arrays that are views of the call's whole argument buffer) keeps nothing of that buffer."""

    def __init__(self, path: str, row: Mapping[str, Any]):
        self.path = path
        self._values: dict[str, Any] = {}  # a light value, or where a heavy one is in the file
        for name, value in row.items():
            self[name] = value

    def __getitem__(self, name: str) -> Any:
        v = self._values[name]
        if not isinstance(v, _OnDisk):
            return v
        with open(self.path, "rb") as f:
            f.seek(v.offset)
            return pickle.loads(f.read(v.length))

    def __setitem__(self, name: str, value: Any) -> None:
        if is_heavy(value):
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            with open(self.path, "ab") as f:
                offset = f.seek(0, os.SEEK_END)
                f.write(data)
            value = _OnDisk(offset, len(data))
        elif isinstance(value, np.ndarray):
            value = np.array(value)
        self._values[name] = value  # a column set again keeps its place in the row's order

    def __delitem__(self, name: str) -> None:
        del self._values[name]

    def __contains__(self, name: object) -> bool:  # without reading the value
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def release(self) -> None:
        """Delete the file: the row's heavy values are gone (its light ones stay readable)."""
        self._values = {k: v for k, v in self._values.items() if not isinstance(v, _OnDisk)}
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
