//! Inode numbers for the mount. A file's inode is one *version* of it: when
//! the source changes, the path gets a new inode, so the kernel's page cache
//! of the old version can never be served for the new one.

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

struct Table {
    by_key: HashMap<(String, String), u64>,
    nodes: HashMap<u64, Node>,
    next: u64,
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
                nodes: HashMap::from([(ROOT, root)]),
                next: ROOT + 1,
            }),
        }
    }

    /// The inode of `path` at this version; directories keep theirs.
    pub fn get_or_insert(&self, path: &str, meta: &ObjectMeta) -> u64 {
        let version = if meta.is_dir {
            String::new()
        } else {
            meta.version.clone()
        };
        let mut t = self.inner.lock();
        if let Some(&ino) = t.by_key.get(&(path.to_string(), version.clone())) {
            if let Some(n) = t.nodes.get_mut(&ino) {
                n.meta = meta.clone();
            }
            return ino;
        }
        let ino = t.next;
        t.next += 1;
        t.by_key.insert((path.to_string(), version), ino);
        t.nodes.insert(
            ino,
            Node {
                path: path.to_string(),
                meta: meta.clone(),
            },
        );
        ino
    }

    pub fn get(&self, ino: u64) -> Option<Node> {
        self.inner.lock().nodes.get(&ino).cloned()
    }
}
