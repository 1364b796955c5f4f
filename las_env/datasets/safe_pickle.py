"""Reading data-set pickles (the CIFAR "python version" batches) without running anything in them.

``pickle.load`` builds whatever a file names, so a file under ``data.root`` could run code when
read. :func:`load_data_pickle` admits only what those files hold: builtin containers, strings,
bytes and numbers (pickle opcodes, no names needed) and numpy arrays, which a pickle spells as
:data:`ALLOWED` (numpy 1's ``numpy.core`` or numpy 2's ``numpy._core``; ``_codecs.encode`` with
the latin-1 codec carries an array's bytes in protocol-2 pickles). Any other name is refused,
unbuilt, with one :class:`las_env.data.DataError` paragraph.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from las_env.data import DataError


class _Refused(pickle.UnpicklingError):
    """A name outside :data:`ALLOWED` (the message is the name)."""


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if codecs.lookup(encoding).name != "iso8859-1":
        raise _Refused(f"_codecs.encode with the codec {encoding!r}")
    return codecs.encode(text, "latin1", errors)


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array rebuilder, under numpy 1 and 2 alike

ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
"""The only names a data-set pickle may use: what pickling a numpy array writes."""


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def load_data_pickle(path: Path) -> Any:
    """Unpickle a data-set file admitting only builtin values and numpy arrays.

    Raises:
        DataError: the file names anything else (refused before it is built), or is not a
            readable pickle at all; the message names the file and the fix.
    """
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="latin1").load()
    except _Refused as exc:
        raise DataError(f"{path} is not a data-set pickle this loader reads: it names `{exc}`, which a CIFAR "
                        f"batch (builtin values and numpy arrays) never holds, so it was refused unread (a file "
                        f"made to run code when loaded looks like this). Replace the folder {path.parent} with "
                        f"the official release or with what shared/data/prepare_cifar.py writes.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as exc:
        raise DataError(f"{path} cannot be read as a data-set pickle ({type(exc).__name__}: {exc}; "
                        f"{path.stat().st_size} bytes): it is cut short or another file. Replace the folder "
                        f"{path.parent} with the official release or with what shared/data/prepare_cifar.py "
                        f"writes.") from None
