//! Data files evicted while a process may still map them. With passthrough
//! the kernel maps the cache file itself, and a mapping outlives its fd, so
//! such a file is never punched: it is unlinked whole, and its memory goes
//! when the last mapping does. Until then it is reported, not counted
//! against the capacity.

use std::collections::HashSet;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::disk::Files;

struct RetiredFile {
    id: (u64, u64),
    bytes: u64,
    /// Still open in this process (a reader copying out of it).
    held: Weak<Files>,
}

#[derive(Default)]
pub struct Retired {
    files: Mutex<Vec<RetiredFile>>,
}

impl Retired {
    pub fn add(&self, files: &Arc<Files>, bytes: u64) {
        if let Some(id) = files.id() {
            self.files.lock().push(RetiredFile {
                id,
                bytes,
                held: Arc::downgrade(files),
            });
        }
    }

    /// Bytes of retired files that some process still holds; forgets the
    /// others.
    pub fn bytes(&self) -> u64 {
        let mut files = self.files.lock();
        if files.is_empty() {
            return 0;
        }
        let mapped = mapped_files();
        files.retain(|f| f.held.strong_count() > 0 || mapped.contains(&f.id));
        files.iter().map(|f| f.bytes).sum()
    }
}

/// (device, inode) of every file mapped by any process on this machine.
fn mapped_files() -> HashSet<(u64, u64)> {
    let mut out = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .as_encoded_bytes()
            .iter()
            .all(u8::is_ascii_digit)
        {
            continue;
        }
        let Ok(maps) = std::fs::read_to_string(p.path().join("maps")) else {
            continue;
        };
        out.extend(maps.lines().filter_map(parse_maps_line));
    }
    out
}

/// `addr perms offset MAJ:MIN inode path` -> (dev, inode).
fn parse_maps_line(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_ascii_whitespace().skip(3);
    let (maj, min) = f.next()?.split_once(':')?;
    let ino: u64 = f.next()?.parse().ok()?;
    if ino == 0 {
        return None;
    }
    let dev = libc::makedev(
        u32::from_str_radix(maj, 16).ok()?,
        u32::from_str_radix(min, 16).ok()?,
    );
    Some((dev, ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_device_and_inode_from_maps_lines() {
        let l = "7f3a5c000000-7f3a60000000 r--s 00000000 00:1a 123456   /dev/shm/x.data (deleted)";
        assert_eq!(parse_maps_line(l), Some((libc::makedev(0, 0x1a), 123456)));
        assert_eq!(
            parse_maps_line("7ffd1000-7ffd2000 r-xp 00000000 00:00 0  [vdso]"),
            None
        );
    }
}
