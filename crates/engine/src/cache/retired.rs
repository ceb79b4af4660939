//! Data files evicted while a process may still map them. With passthrough
//! the kernel maps the cache file itself, and a mapping outlives its fd, so
//! such a file is never punched: it is unlinked whole, and its memory goes
//! when the last mapping does. Until then it is reported, not counted
//! against the capacity.
//!
//! /proc/PID/maps cannot tell: it names a passthrough mapping by the FUSE
//! file, not the cache file behind it. inotify can: IN_DELETE_SELF comes
//! when the last reference to an unlinked inode is gone.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use parking_lot::Mutex;
use tracing::warn;

use super::disk::Files;

#[derive(Default)]
struct Watches {
    fd: Option<OwnedFd>,
    /// Bytes of each retired file, by watch descriptor.
    bytes: HashMap<i32, u64>,
}

#[derive(Default)]
pub struct Retired {
    w: Mutex<Watches>,
}

impl Watches {
    fn fd(&mut self) -> io::Result<i32> {
        if self.fd.is_none() {
            // SAFETY: inotify_init1 returns a new fd or -1.
            let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh fd we own.
            self.fd = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        Ok(self.fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1))
    }

    /// Forgets the files whose last reference is gone.
    fn drain(&mut self) {
        let Some(fd) = self.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: read(2) into a buffer we own, of its length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return;
            }
            let mut at = 0usize;
            let head = std::mem::size_of::<libc::inotify_event>();
            while at + head <= n as usize {
                // SAFETY: the kernel wrote whole events; read_unaligned copes
                // with the byte buffer's alignment.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr().add(at).cast()) };
                if ev.mask & (libc::IN_DELETE_SELF | libc::IN_IGNORED) != 0 {
                    self.bytes.remove(&ev.wd);
                }
                at += head + ev.len as usize;
            }
        }
    }
}

impl Retired {
    /// Watches a file about to be unlinked, through the fd we hold on it.
    pub fn add(&self, files: &Files, bytes: u64) {
        let mut w = self.w.lock();
        w.drain();
        let path = format!("/proc/self/fd/{}\0", files.data.as_raw_fd());
        let wd = w.fd().and_then(|fd| {
            // SAFETY: a NUL-terminated path; the fd is our inotify instance.
            let wd =
                unsafe { libc::inotify_add_watch(fd, path.as_ptr().cast(), libc::IN_DELETE_SELF) };
            if wd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(wd)
            }
        });
        match wd {
            Ok(wd) => {
                w.bytes.insert(wd, bytes);
            }
            Err(e) => {
                warn!("cannot follow a retired cache file (inotify: {e}); stat will not count it")
            }
        }
    }

    /// Bytes of retired files that some process still holds.
    pub fn bytes(&self) -> u64 {
        let mut w = self.w.lock();
        w.drain();
        w.bytes.values().sum()
    }
}
