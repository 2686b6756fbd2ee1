"""The one record loop every kind of data is read with (SFT formats in data.formats, preference
shapes in data.pref_formats): each record shaped and its format named by the kind, held to the
file's first record's format, normalised; with skip_bad_lines a record's one-line error (which
names its file:line) becomes a skip instead. Framework-free.
"""

from __future__ import annotations

from typing import Any, Protocol

from qlocal.errors import UserError

SKIP_HINT = "fix the record or pass --skip-bad-lines"


class Kind(Protocol):
    """The steps a kind of data supplies to the loop."""

    unit: str  # what one file must hold one of, for the mixed-file error ("format", "kind")

    def shape(self, original: dict, where: str) -> tuple[str, Any]:
        """(format name, record ready to normalise) of one raw record; a UserError when none fits."""
        ...

    def compatible(self, this: str, first: str) -> bool:
        """Whether a record of format `this` may follow a file whose first record is `first`."""
        ...

    def normalise(self, record: Any, this: str, where: str, original: dict) -> Any:
        """The sample of one shaped record; a UserError naming `where` when a field is bad."""
        ...


def read_all(path: str, records: list[tuple[dict, str]], skipped: list[str], fmt: str, fixed_where: str,
             kind: Kind, skip_bad_lines: bool) -> tuple[list[Any], dict[str, Any]]:
    """Every record of `records` (from data.readers.load_records, which appended its own bad lines
    to `skipped`) as a sample of `kind`. fmt "auto" takes the file's format from its first record;
    any other is fixed (named `fixed_where` in the mixed-file error). Returns (samples, stats), stats
    {"format": name, "counts": {name: n}, "skipped": n, "skipped_where": [first few locations]}.
    """
    first, first_where = (None, "") if fmt == "auto" else (fmt, fixed_where)
    samples: list[Any] = []
    counts: dict[str, int] = {}
    for original, where in records:
        try:
            this, record = kind.shape(original, where)
            if first is None:
                first, first_where = this, where
            elif not kind.compatible(this, first):
                raise UserError(f"{where}: record is {this} but the file's first record ({first_where}) is {first}; "
                                f"one file must hold one {kind.unit}: {SKIP_HINT}")
            samples.append(kind.normalise(record, this, where, original))
            counts[this] = counts.get(this, 0) + 1
        except UserError:
            if not skip_bad_lines:
                raise
            skipped.append(where)
    if not samples:
        raise UserError(f"{path}: no usable records ({len(skipped)} skipped as bad)")
    return samples, {"format": first, "counts": counts, "skipped": len(skipped), "skipped_where": skipped[:5]}
