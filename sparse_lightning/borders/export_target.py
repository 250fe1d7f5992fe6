"""Where an export goes: checked before any work, written aside, moved into place whole.

An export directory either appears complete or not at all: everything is written into a hidden sibling
(`.NAME.partial-XXXX`) and renamed into place on success, so a kill -9 or a full disk mid-export leaves no half-written
directory that `from_pretrained` or `apply_delta` would load (at most that hidden sibling). An existing non-empty
target is refused unless `replace` is asked for; then the old directory is renamed aside, the new one renamed in and
the old one deleted (a kill between the two renames leaves the old one as `.NAME.old-XXXX`, nothing mixed; the next export to that name
says where it is).
"""

from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


class ExportTargetError(ValueError):
    """An export target that cannot be used, or could not be written; nothing was changed there."""


def check_export_target(output: str | os.PathLike | None, replace: bool = False,
                        keep: Iterable[str | os.PathLike] = ()) -> Path:
    """The target as an absolute path, after refusing an empty name, a file, a non-empty directory (unless
    `replace`), and a replacement that would delete the working directory or a path in `keep` (the checkpoint)."""
    if output is None or not str(output).strip():
        raise ExportTargetError("the export output is empty (--output \"\"): name a new directory for the export")
    target = Path(output).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ExportTargetError(f"{output} is a file, not a directory: name a new directory for the export (--output)")
    entries = sorted(entry.name for entry in target.iterdir()) if target.is_dir() else []
    if entries and not replace:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ExportTargetError(f"{output} is not empty ({len(entries)} entries: {shown}): name a new directory, or "
                                "replace it whole with --replace true (replace=True)")
    warn_about_interrupted_exports(target)
    resolved = target.resolve()
    for inside in (Path.cwd(), *(Path(path) for path in keep)):
        inside = inside.expanduser().resolve()
        if inside == resolved or resolved in inside.parents:
            what = "the working directory" if inside == Path.cwd().resolve() else str(inside)
            raise ExportTargetError(f"the export would replace {output}, which holds {what}: name another directory "
                                    "for the export")
    return target


def warn_about_interrupted_exports(target: Path) -> None:
    """Say where an earlier export to `target` that was killed left its hidden siblings: a `.NAME.old-*` holds the
    directory a `--replace` was replacing (the only copy, if `target` is gone), a `.NAME.partial-*` an unfinished one.
    They are not deleted here: another export to the same name may still be writing one."""
    leftovers = sorted(path.name for path in target.parent.glob(f".{glob.escape(target.name)}.*-*")
                       if path.is_dir() and path.name.rpartition("-")[0] in (f".{target.name}.old", f".{target.name}.partial"))
    if leftovers:
        warnings.warn(f"an earlier export to {target} was interrupted and left {', '.join(leftovers)} in "
                      f"{target.parent}: a .old-* directory is the export it was replacing (move it back if you need "
                      "it), a .partial-* one is unfinished; delete them when no export is running", stacklevel=3)


@contextmanager
def staged_export(target: Path, replace: bool = False) -> Iterator[Path]:
    """A fresh hidden sibling of `target` to write into; moved into place whole when the block succeeds, deleted when
    it fails (a write error becomes `ExportTargetError` naming `target`). `target` comes from `check_export_target`."""
    token = secrets.token_hex(4)
    staging = target.parent / f".{target.name}.partial-{token}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as error:
        raise _write_error(target, error) from None
    try:
        yield staging
        _move_into_place(staging, target, replace, token)
    except (OSError, SafetensorError) as error:
        raise _write_error(target, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def published(written: dict[str, Path], staging: Path, target: Path) -> dict[str, Path]:
    """`written`'s paths as they are once `staging` became `target`."""
    return {kind: target / Path(path).relative_to(staging) for kind, path in written.items()}


def _move_into_place(staging: Path, target: Path, replace: bool, token: str) -> None:
    if replace and target.is_dir() and any(target.iterdir()):
        old = target.parent / f".{target.name}.old-{token}"
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)  # atomic; replaces only an empty directory


def _write_error(target: Path, error: BaseException) -> ExportTargetError:
    reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
    if isinstance(error, OSError) and error.errno == errno.ENOTEMPTY:  # ENOTEMPTY: someone filled the target meanwhile
        reason = "it was filled by someone else while exporting"
    return ExportTargetError(f"cannot write the export to {target}: {reason}; nothing was written there (choose "
                             "another --output or free space)")
