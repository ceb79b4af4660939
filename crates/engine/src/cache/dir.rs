//! The cache directory. Only this daemon's user may write it: a directory
//! someone else could write lets them plant chunks whose crc32c match
//! (poisoned weights) or symlinks that root then truncates. Every file in it
//! is reached through the directory's own fd with O_NOFOLLOW, so a path
//! swapped after the checks is never followed.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::Path;

use crate::{Error, Result};

pub struct CacheDir {
    fd: OwnedFd,
    /// Held for the life of the process: one mount per cache dir.
    _lock: File,
}

fn cstr(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn openat(dir: RawFd, name: &str, flags: libc::c_int) -> io::Result<File> {
    let c = cstr(name)?;
    // SAFETY: openat(2) relative to a directory fd we own; the new fd is ours.
    let fd = check(unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    })?;
    // SAFETY: a fresh fd from openat(2).
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl CacheDir {
    /// Creates `path` (0700) if missing, checks who may write it, and locks
    /// it for this process.
    pub fn open(path: &Path) -> Result<CacheDir> {
        let shown = path.display();
        let config = |why: String| Error::Config(format!("cache dir {shown} {why}"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| {
                config(format!(
                    "is not writable (creating it: {e}); pass --cache-dir a writable directory"
                ))
            })?;
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(config(
                "is a symbolic link; pass --cache-dir the real directory".into(),
            ));
        }
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| config("has a NUL byte in its name".into()))?;
        // SAFETY: open(2) with a valid C string; the fd is ours.
        let raw = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return Err(
                if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) {
                    config("is not a directory (or was swapped for a link); pass --cache-dir a directory".into())
                } else {
                    config(format!(
                        "cannot be opened ({e}); pass --cache-dir a writable directory"
                    ))
                },
            );
        }
        // SAFETY: a fresh fd from open(2).
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fstat on our fd into a zeroed stat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })
            .map_err(|e| Error::io("cache dir", e))?;
        // SAFETY: no arguments, cannot fail.
        let me = unsafe { libc::geteuid() };
        if st.st_uid != me {
            return Err(config(format!(
                "belongs to uid {} but this daemon runs as uid {me}: that user could plant chunks in it; remove it or pass --cache-dir a directory of your own",
                st.st_uid
            )));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(config(format!(
                "is writable by other users (mode {:o}), who could plant chunks in it; run `chmod 700 {shown}` or pass another --cache-dir",
                st.st_mode & 0o7777
            )));
        }
        // Whoever may rename entries of the parent may swap this dir for
        // theirs between two mounts.
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(parent).map_err(|e| Error::io("cache dir's parent", e))?;
            let sticky = m.mode() & 0o1000 != 0;
            if m.uid() != me && m.uid() != 0 {
                return Err(config(format!(
                    "is in {}, which belongs to uid {}, who could swap it; pass --cache-dir a directory whose parents belong to you or root",
                    parent.display(),
                    m.uid()
                )));
            }
            if m.mode() & 0o022 != 0 && !sticky {
                // A Kubernetes emptyDir is root's and 0777: the pod's own
                // containers could swap the dir, not other users of the host.
                tracing::warn!(
                    "cache dir {shown} is in {}, which others may write (mode {:o}); prefer a parent only you can write",
                    parent.display(),
                    m.mode() & 0o7777
                );
            }
        }
        let lock = openat(fd.as_raw_fd(), ".lock", libc::O_CREAT | libc::O_RDWR).map_err(|e| {
            config(format!(
                "cannot hold its lock file .lock ({e}); remove that file or pass another --cache-dir"
            ))
        })?;
        // A process that is exiting, or a child forked between its open and
        // its exec, may hold the lock a moment longer: wait up to 2 s.
        // SAFETY: flock on an fd we own.
        let take = || unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        let held = take()
            || (0..20).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                take()
            });
        if !held {
            let mut pid = vec![0u8; 32];
            let n = lock.read_at(&mut pid, 0).unwrap_or(0);
            return Err(Error::Config(format!(
                "cache dir {shown} is in use by another modelfs process (pid {}); give this mount its own --cache-dir",
                String::from_utf8_lossy(&pid[..n]).trim()
            )));
        }
        let pid = std::process::id().to_string();
        lock.set_len(0)
            .and_then(|()| lock.write_all_at(pid.as_bytes(), 0))
            .map_err(|e| {
                config(format!(
                    "is not writable ({e}); pass --cache-dir a writable directory"
                ))
            })?;
        Ok(CacheDir { fd, _lock: lock })
    }

    /// Opens an existing file of the cache for reading and writing.
    pub fn open_file(&self, name: &str) -> io::Result<File> {
        openat(self.fd.as_raw_fd(), name, libc::O_RDWR)
    }

    /// Makes a new, empty file; an old file of that name is unlinked first,
    /// never truncated, since a process may still map it.
    pub fn create_file(&self, name: &str) -> io::Result<File> {
        self.remove(name);
        openat(
            self.fd.as_raw_fd(),
            name,
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
        )
    }

    pub fn remove(&self, name: &str) {
        if let Ok(c) = cstr(name) {
            // SAFETY: unlinkat(2) relative to our directory fd.
            unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) };
        }
    }

    /// The names of the files in the directory.
    pub fn names(&self) -> io::Result<Vec<String>> {
        // /proc/self/fd/N lists the directory this fd holds, wherever its
        // path now leads.
        let rd = std::fs::read_dir(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))?;
        Ok(rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    /// Bytes the directory's filesystem can still give this user.
    pub fn available(&self) -> io::Result<u64> {
        // SAFETY: fstatvfs on our fd into a zeroed struct.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        check(unsafe { libc::fstatvfs(self.fd.as_raw_fd(), &mut s) })?;
        Ok(s.f_bavail as u64 * s.f_frsize as u64)
    }
}

/// A read-only file of the same inode as `f`, for the kernel to read
/// directly (passthrough): reopened through the fd, never through a path.
pub fn reopen_read_only(f: &File) -> io::Result<File> {
    File::open(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn refuses_dirs_others_can_write_and_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let open = CacheDir::open(&t.path().join("c")).unwrap();
        let mode = std::fs::metadata(t.path().join("c"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "created 0700");
        drop(open);

        let wide = t.path().join("wide");
        std::fs::create_dir(&wide).unwrap();
        std::fs::set_permissions(&wide, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = CacheDir::open(&wide).err().unwrap().to_string();
        assert!(e.contains("writable by other users"), "{e}");

        let link = t.path().join("link");
        std::os::unix::fs::symlink(t.path().join("c"), &link).unwrap();
        let e = CacheDir::open(&link).err().unwrap().to_string();
        assert!(e.contains("symbolic link"), "{e}");

        let other = t.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::os::unix::fs::chown(&other, Some(65534), Some(65534)).unwrap();
        let e = CacheDir::open(&other).err().unwrap().to_string();
        assert!(e.contains("belongs to uid 65534"), "{e}");
        // A parent another user owns (say, a /dev/shm/modelfs they made first).
        let e = CacheDir::open(&other.join("c")).err().unwrap().to_string();
        assert!(e.contains("which belongs to uid 65534"), "{e}");
        // Inside a root-owned 0777 dir (a Kubernetes emptyDir) it is made 0700.
        assert!(CacheDir::open(&wide.join("c")).is_ok());
    }

    #[test]
    fn never_follows_a_planted_symlink() {
        let t = tempfile::tempdir().unwrap();
        let d = CacheDir::open(&t.path().join("c")).unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, t.path().join("c/x.data")).unwrap();
        assert!(d.open_file("x.data").is_err());
        let f = d.create_file("x.data").unwrap();
        f.write_all_at(b"cache", 0).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
