"""Writing directories so that a reader never sees a half-written one."""

from __future__ import annotations

import os
import shutil
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
