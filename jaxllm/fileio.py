"""Writing directories so that a reader never sees a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


def replace_dir(new: Path, target: Path) -> None:
    """Swap the finished directory `new` into `target`: at every moment `target` is either the old
    or the new directory, and the old one is deleted only once the new one is in place."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def new_dir(out_dir, *, overwrite: bool = False):
    """Yield a temporary directory next to `out_dir`; when the block finishes it replaces `out_dir`
    in one swap (an error leaves `out_dir` as it was). A non-empty `out_dir` is refused unless
    `overwrite`."""
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory or pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
