//! Inode numbers for the mount. A file's inode is one *version* of it: when
//! the source changes, the path gets a new inode, so the kernel's page cache
//! of the old version can never be served for the new one.
//!
//! An inode lives while the kernel holds it: each entry a lookup returns adds
//! one to its count, FUSE forget takes the kernel's count away, and at zero
//! the inode leaves the table. Numbers are never reused, so a late request
//! for a forgotten number finds nothing instead of another file.

use std::collections::HashMap;
use std::time::SystemTime;

use modelfs_engine::ObjectMeta;
use parking_lot::Mutex;

pub const ROOT: u64 = 1;

#[derive(Debug, Clone)]
pub struct Node {
    pub path: String,
    pub meta: ObjectMeta,
}

pub struct Inodes {
    inner: Mutex<Table>,
}

struct Entry {
    node: Node,
    lookups: u64,
}

struct Table {
    by_key: HashMap<(String, String), u64>,
    nodes: HashMap<u64, Entry>,
    next: u64,
}

/// Directories keep one inode across changes; a file's version is part of it.
fn key(path: &str, meta: &ObjectMeta) -> (String, String) {
    let version = if meta.is_dir {
        String::new()
    } else {
        meta.version.clone()
    };
    (path.to_string(), version)
}

impl Inodes {
    pub fn new(root_mtime: SystemTime) -> Self {
        let root = Node {
            path: String::new(),
            meta: ObjectMeta {
                is_dir: true,
                size: 0,
                mtime: root_mtime,
                version: String::new(),
            },
        };
        Inodes {
            inner: Mutex::new(Table {
                by_key: HashMap::from([((String::new(), String::new()), ROOT)]),
                nodes: HashMap::from([(
                    ROOT,
                    Entry {
                        node: root,
                        lookups: 1,
                    },
                )]),
                next: ROOT + 1,
            }),
        }
    }

    /// The inode of `path` at this version, counted as one more lookup the
    /// kernel holds: call it only for an entry that is sent to the kernel.
    pub fn lookup(&self, path: &str, meta: &ObjectMeta) -> u64 {
        let key = key(path, meta);
        let mut t = self.inner.lock();
        if let Some(&ino) = t.by_key.get(&key) {
            if let Some(e) = t.nodes.get_mut(&ino) {
                e.node.meta = meta.clone();
                e.lookups += 1;
                return ino;
            }
        }
        let ino = t.next;
        t.next += 1;
        t.by_key.insert(key, ino);
        t.nodes.insert(
            ino,
            Entry {
                node: Node {
                    path: path.to_string(),
                    meta: meta.clone(),
                },
                lookups: 1,
            },
        );
        ino
    }

    /// The inode of `path` at this version if the kernel holds one; a
    /// listing does not create inodes, or listing alone would fill the table.
    pub fn peek(&self, path: &str, meta: &ObjectMeta) -> Option<u64> {
        self.inner.lock().by_key.get(&key(path, meta)).copied()
    }

    /// The inode of one version of a file, if the kernel holds one (only an
    /// inode the kernel holds can have pages in its cache).
    pub fn file(&self, path: &str, version: &str) -> Option<u64> {
        self.inner
            .lock()
            .by_key
            .get(&(path.to_string(), version.to_string()))
            .copied()
    }

    /// The kernel dropped `n` of its lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut t = self.inner.lock();
        let Some(e) = t.nodes.get_mut(&ino) else {
            return;
        };
        e.lookups = e.lookups.saturating_sub(n);
        if e.lookups > 0 {
            return;
        }
        if let Some(e) = t.nodes.remove(&ino) {
            let key = key(&e.node.path, &e.node.meta);
            if t.by_key.get(&key) == Some(&ino) {
                t.by_key.remove(&key);
            }
        }
    }

    pub fn get(&self, ino: u64) -> Option<Node> {
        self.inner.lock().nodes.get(&ino).map(|e| e.node.clone())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(version: &str) -> ObjectMeta {
        ObjectMeta {
            is_dir: false,
            size: 1,
            mtime: SystemTime::UNIX_EPOCH,
            version: version.into(),
        }
    }

    #[test]
    fn an_inode_leaves_when_the_kernel_forgets_every_lookup() {
        let t = Inodes::new(SystemTime::UNIX_EPOCH);
        let a = t.lookup("a", &file("v1"));
        assert_eq!(t.lookup("a", &file("v1")), a);
        assert_eq!(t.peek("a", &file("v1")), Some(a));
        assert_eq!(t.file("a", "v1"), Some(a));
        assert_eq!(t.file("a", "v2"), None);
        t.forget(a, 1);
        assert!(t.get(a).is_some());
        t.forget(a, 1);
        assert!(t.get(a).is_none() && t.peek("a", &file("v1")).is_none());
        assert_ne!(t.lookup("a", &file("v1")), a, "numbers are not reused");
        t.forget(ROOT, 1);
        assert!(t.get(ROOT).is_some());
    }
}
