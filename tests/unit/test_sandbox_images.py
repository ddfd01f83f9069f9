"""The sandbox's container image cache as data."""

from __future__ import annotations

import os
import time

from fabfile.sandbox import images


def test_archives_of_other_keys_stay_a_week_so_another_checkout_can_still_load_its_own(tmp_path):
    family = images.POSTGRES
    names = {"current": "ctr-postgres-new.tar.zst", "meta": "ctr-postgres-new.tar.zst.json",
             "recent": "ctr-postgres-other.tar.zst", "old": "ctr-postgres-old.tar.zst",
             "old_meta": "ctr-postgres-old.tar.zst.json", "other_family": "ctr-python-base-old.tar.zst"}
    for name in names.values():
        (tmp_path / name).write_text("x")
    week_ago = time.time() - images.STALE_ARCHIVE_AGE - 60
    for key in ("old", "old_meta", "other_family"):
        os.utime(tmp_path / names[key], (week_ago, week_ago))
    images.prune_stale_archives(family, keep=(names["current"], names["meta"]), directory=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["current"], names["meta"], names["recent"], names["other_family"]])
