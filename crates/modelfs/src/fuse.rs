//! The FUSE front end: a thin adapter from fuser's callbacks to the engine.
//! Anything that may wait on the source runs on the tokio runtime and replies
//! from there, so FUSE worker threads never block on the network.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, Notifier, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request,
};
use modelfs_engine::cache::WholeFilePin;
use modelfs_engine::namespace::Namespace;
use modelfs_engine::{Engine, Error, FileVersion, ObjectMeta, OpenFile};
use parking_lot::Mutex;
use tracing::{debug, info, warn};

use crate::inodes::{Inodes, Node, ROOT};

/// The inode number libfuse lists for an entry it has no inode for.
const FUSE_UNKNOWN_INO: u64 = 0xffff_ffff;

/// The xattr on the mount root that `modelfs stat` reads.
pub const STATS_XATTR: &str = "user.modelfs.stats";
/// On each file: `{"size":N,"cached":M}`, bytes of this version in the
/// cache. Answered from the registry: no byte is read, nothing is fetched.
pub const CACHED_XATTR: &str = "user.modelfs.cached";

struct Handle {
    open: OpenFile,
    ino: u64,
    /// Holds the cache file's chunks in place while the kernel reads it.
    pin: Option<WholeFilePin>,
}

/// How the inode's open handles read: the kernel forbids mixing page-cache
/// and passthrough opens of one inode, so the first open decides.
#[derive(Default)]
struct InodeOpens {
    cached: usize,
    passthrough: Option<Backing>,
}

/// The file the kernel reads an inode's passthrough opens from: one for
/// all of them (the kernel refuses another while any is open).
struct Backing {
    id: BackingId,
    /// Which cache file it is: a cache file retired while open here (a
    /// liar's chunk dropped) is another file than the one a later pin of
    /// the same version hands over.
    file: FileId,
    opens: usize,
}

/// (st_dev, st_ino) of an open file: unique while it is open, as the
/// backing file is while its id is held.
type FileId = (u64, u64);

fn file_id(f: &std::fs::File) -> Option<FileId> {
    f.metadata().ok().map(|m| (m.dev(), m.ino()))
}

struct Inner {
    engine: Arc<Engine>,
    rt: tokio::runtime::Handle,
    inodes: Inodes,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    opens: Mutex<HashMap<u64, InodeOpens>>,
    next_fh: AtomicU64,
    ttl: Duration,
    passthrough: Mutex<Result<(), String>>,
    uid: u32,
    gid: u32,
}

pub struct ModelFs {
    inner: Arc<Inner>,
}

/// What the engine dropped from its cache: byte ranges of a file version.
type Dropped = (FileVersion, Vec<Range<u64>>);

/// Drops the kernel's cached pages of what the engine drops from its cache
/// because the server that sent it was caught lying: handles open with
/// `FOPEN_KEEP_CACHE` would otherwise go on reading the liar's bytes from
/// the page cache, and so would every later open of the inode.
pub struct Invalidator {
    inner: Weak<Inner>,
}

impl Invalidator {
    /// Notifies through `notifier`, the session's, from a thread of its own:
    /// the engine's hook only queues, so no async worker ever blocks on
    /// /dev/fuse, and no FUSE request handler sends a notification (the
    /// kernel may hold the very pages to drop locked until our reply to a
    /// read of them; from here, that reply comes meanwhile).
    pub fn start(self, notifier: Notifier) -> io::Result<()> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let (tx, rx) = mpsc::channel::<Dropped>();
        let weak = self.inner;
        std::thread::Builder::new()
            .name("modelfs-inval".into())
            .spawn(move || invalidate(&weak, &rx, &notifier))?;
        inner.engine.on_dropped(move |file, ranges| {
            let _ = tx.send((file.clone(), ranges.to_vec()));
        });
        Ok(())
    }
}

/// Set while the invalidation thread is inside the kernel: `inval_inode`
/// waits, uninterruptibly, for pages locked by reads only this daemon can
/// answer, so the daemon must not exit (and stop answering) meanwhile.
static INVALIDATING: AtomicBool = AtomicBool::new(false);
/// Set at shutdown: no notification is started after it.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Stops notifications and waits, at most `bound`, for one in the kernel
/// to return; `false` if it did not (see [`INVALIDATING`]).
pub fn stop_invalidating(bound: Duration) -> bool {
    STOPPING.store(true, Ordering::SeqCst);
    let t = std::time::Instant::now();
    while INVALIDATING.load(Ordering::SeqCst) {
        if t.elapsed() >= bound {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn invalidate(inner: &Weak<Inner>, rx: &mpsc::Receiver<Dropped>, notifier: &Notifier) {
    for (file, ranges) in rx {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // No inode, no pages: the kernel drops an inode's pages before it
        // forgets the inode.
        let Some(ino) = inner.inodes.file(&file.path, &file.version) else {
            debug!(path = %file.path, "no inode: no cached pages to drop");
            continue;
        };
        drop(inner);
        let mut bytes = 0;
        for r in &ranges {
            let len = r.end - r.start;
            INVALIDATING.store(true, Ordering::SeqCst);
            if STOPPING.load(Ordering::SeqCst) {
                INVALIDATING.store(false, Ordering::SeqCst);
                return;
            }
            let sent = notifier.inval_inode(INodeNo(ino), r.start as i64, len as i64);
            INVALIDATING.store(false, Ordering::SeqCst);
            match sent {
                Ok(()) => bytes += len,
                Err(e) => {
                    // The session is gone or refuses: so will the next.
                    warn!(
                        path = %file.path,
                        "cannot drop the kernel's cached pages of a liar's chunks: {e}"
                    );
                    break;
                }
            }
        }
        info!(path = %file.path, bytes, "dropped the kernel's cached pages of a liar's chunks");
    }
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl ModelFs {
    pub fn new(engine: Arc<Engine>, rt: tokio::runtime::Handle, root_mtime: SystemTime) -> Self {
        let ttl = engine.config().listing_ttl;
        ModelFs {
            inner: Arc::new(Inner {
                engine,
                rt,
                inodes: Inodes::new(root_mtime),
                handles: Mutex::default(),
                opens: Mutex::default(),
                next_fh: AtomicU64::new(1),
                ttl,
                passthrough: Mutex::new(Err("not negotiated yet".into())),
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
            }),
        }
    }

    /// To start with the session's notifier, before the session serves.
    pub fn invalidator(&self) -> Invalidator {
        Invalidator {
            inner: Arc::downgrade(&self.inner),
        }
    }
}

impl Inner {
    fn attr(&self, ino: u64, meta: &ObjectMeta) -> FileAttr {
        let (kind, perm, nlink) = if meta.is_dir {
            (FileType::Directory, 0o555, 2)
        } else {
            (FileType::RegularFile, 0o444, 1)
        };
        FileAttr {
            ino: INodeNo(ino),
            size: meta.size,
            blocks: meta.size.div_ceil(512),
            atime: meta.mtime,
            mtime: meta.mtime,
            ctime: meta.mtime,
            crtime: meta.mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.inodes.get(ino.0).ok_or(Errno::ENOENT)
    }

    fn stats_json(&self, passthrough: &str) -> Vec<u8> {
        let mut s = self.engine.snapshot();
        s.passthrough = passthrough.to_string();
        let mut v = serde_json::to_value(&s).unwrap_or_default();
        v["inodes"] = self.inodes.len().into();
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// Opens `node` if it is still the source's current version. A changed
    /// file answers ESTALE: the kernel then looks the path up again, gets the
    /// new version's inode and opens that.
    async fn open(self: Arc<Self>, ino: u64, node: Node, reply: ReplyOpen) {
        let fresh = match self.engine.namespace().revalidate(&node.path).await {
            Ok(m) => m,
            Err(Error::NotFound(_)) => return reply.error(Errno::ESTALE),
            // The file may well be there: this open fails, the next asks again.
            Err(e) => {
                warn!(path = %node.path, "open: checking the file with the source failed: {e}");
                return reply.error(Errno::EIO);
            }
        };
        if fresh.version != node.meta.version || fresh.is_dir {
            // The kernel looks the path up again and gets the new version's
            // inode: revalidate wrote it into the listing.
            info!(path = %node.path, "source changed; serving the new version");
            return reply.error(Errno::ESTALE);
        }
        let file = FileVersion {
            path: node.path.clone(),
            version: fresh.version,
            size: fresh.size,
        };
        let open = match self.engine.open(file) {
            Ok(o) => o,
            Err(e) => {
                warn!(path = %node.path, "open: {e}");
                return reply.error(errno(&e));
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        // An inode already open through passthrough keeps it, whatever a
        // later refusal turned off for new inodes.
        let passthrough_on = self.passthrough.lock().is_ok()
            || self
                .opens
                .lock()
                .get(&ino)
                .is_some_and(|s| s.passthrough.is_some());
        // Pinning a file restored after a restart checks every chunk's crc,
        // so it runs before the opens lock is taken.
        let pin = passthrough_on
            .then(|| tokio::task::block_in_place(|| self.engine.pin_complete(&open)))
            .flatten();
        let mut opens = self.opens.lock();
        let state = opens.entry(ino).or_default();
        let mut handle = Handle {
            open,
            ino,
            pin: None,
        };
        if let Some(pin) = pin.filter(|_| state.cached == 0) {
            let file = file_id(&pin.file);
            let backing = match (state.passthrough.take(), file) {
                (Some(b), Some(f)) if b.file == f => Some(Ok(b)),
                // The cache file the open handles read was retired under
                // them (a liar's chunk in it was dropped) and every chunk
                // was fetched again into a new one: their backing id still
                // names the old file, with the liar's bytes, so it must not
                // serve this open, and the kernel takes no second backing
                // file for the inode while they are open. EBUSY below.
                (Some(b), _) => {
                    state.passthrough = Some(b);
                    None
                }
                (None, Some(f)) => Some(reply.open_backing(&pin.file).map(|id| Backing {
                    id,
                    file: f,
                    opens: 0,
                })),
                (None, None) => None,
            };
            // Retired between the pin and now: its file may hold chunks
            // just dropped. A fresh backing id is closed again (read below
            // through the page cache); a reused one stays the old handles'.
            let backing = match backing {
                Some(Ok(b)) if !pin.current() => {
                    if b.opens > 0 {
                        state.passthrough = Some(b);
                    }
                    None
                }
                other => other,
            };
            match backing {
                Some(Ok(mut b)) => {
                    handle.pin = Some(pin);
                    modelfs_engine::stats::add(&self.engine.stats().passthrough_opens, 1);
                    // In the table before the kernel knows the handle, so a
                    // release that follows at once finds it.
                    self.handles.lock().insert(fh, Arc::new(handle));
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b.id);
                    b.opens += 1;
                    state.passthrough = Some(b);
                    return;
                }
                Some(Err(e)) => {
                    warn!("passthrough refused by the kernel ({e}); reading through userspace");
                    *self.passthrough.lock() = Err(format!("kernel refused backing file: {e}"));
                }
                None => {}
            }
        }
        if state.passthrough.is_some() {
            // Cannot mix with the passthrough opens of this inode, nor give
            // it a second backing file. This is also what an open gets
            // while the inode stays open through passthrough after its
            // cache file was retired (a liar's chunk dropped): until every
            // chunk is cached again it cannot be pinned, and after, it is
            // another file (above). Once the last of those handles is
            // released, the next open gets a fresh backing file, or reads
            // through the page cache if the file is still incomplete.
            return reply.error(Errno::EBUSY);
        }
        state.cached += 1;
        drop(opens);
        self.handles.lock().insert(fh, Arc::new(handle));
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn release(&self, fh: u64) {
        let Some(h) = self.handles.lock().remove(&fh) else {
            return;
        };
        let mut opens = self.opens.lock();
        if let Some(state) = opens.get_mut(&h.ino) {
            if h.pin.is_some() {
                if let Some(b) = &mut state.passthrough {
                    b.opens -= 1;
                    if b.opens == 0 {
                        state.passthrough = None;
                    }
                }
            } else {
                state.cached -= 1;
            }
            if state.cached == 0 && state.passthrough.is_none() {
                opens.remove(&h.ino);
            }
        }
    }
}

impl Filesystem for ModelFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let pt = if config
            .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
            .is_err()
        {
            Err("the kernel does not offer FUSE passthrough (needs Linux 6.9 or later)".into())
        } else if config.set_max_stack_depth(1).is_err() {
            Err("the kernel refused a stacking depth of 1".into())
        } else if !nix::unistd::geteuid().is_root() {
            Err("passthrough needs CAP_SYS_ADMIN (run as root)".into())
        } else {
            Ok(())
        };
        info!(passthrough = ?pt, "FUSE session negotiated");
        *self.inner.passthrough.lock() = pt;
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let inner = self.inner.clone();
        let parent = match inner.node(parent) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let Some(name) = name.to_str().map(str::to_string) else {
            return reply.error(Errno::ENOENT);
        };
        self.inner.rt.spawn(async move {
            let path = Namespace::child(&parent.path, &name);
            match inner.engine.namespace().lookup(&path).await {
                Ok(meta) => {
                    let ino = inner.inodes.lookup(&path, &meta);
                    reply.entry(&inner.ttl, &inner.attr(ino, &meta), Generation(0));
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// Also serves BATCH_FORGET: fuser's default `batch_forget` calls this
    /// for each inode (0.18 does not export its argument type to override it).
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inner.node(ino) {
            Ok(n) => reply.attr(&self.inner.ttl, &self.inner.attr(ino.0, &n.meta)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        let node = match self.inner.node(ino) {
            Ok(n) if n.meta.is_dir => return reply.error(Errno::EISDIR),
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let inner = self.inner.clone();
        self.inner.rt.spawn(inner.open(ino.0, node, reply));
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let inner = self.inner.clone();
        self.inner.rt.spawn(async move {
            let Some(h) = inner.handles.lock().get(&fh.0).cloned() else {
                return reply.error(Errno::EBADF);
            };
            let started = std::time::Instant::now();
            let result = inner.engine.read(&h.open, offset, size as u64).await;
            metrics::histogram!("modelfs_read_duration_seconds").record(started.elapsed());
            match result {
                Ok(b) => reply.data(&b),
                // The engine logged the path and cause; readers see EIO.
                Err(_) => reply.error(Errno::EIO),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.inner.release(fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inner.node(ino) {
            Ok(n) if n.meta.is_dir => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let inner = self.inner.clone();
        let node = match inner.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.inner.rt.spawn(async move {
            let listing = match inner.engine.namespace().list(&node.path).await {
                Ok(l) => l,
                Err(e) => return reply.error(errno(&e)),
            };
            let mut entries = vec![
                (ino.0, FileType::Directory, ".".to_string()),
                (ROOT, FileType::Directory, "..".to_string()),
            ];
            for e in listing.iter() {
                let path = Namespace::child(&node.path, &e.name);
                // Like libfuse, an entry the kernel holds no inode for is
                // listed with the unknown inode number.
                let child = inner
                    .inodes
                    .peek(&path, &e.meta)
                    .unwrap_or(FUSE_UNKNOWN_INO);
                let kind = if e.meta.is_dir {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                entries.push((child, kind, e.name.clone()));
            }
            for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let data = if ino.0 == ROOT && name == STATS_XATTR {
            let pt = match &*self.inner.passthrough.lock() {
                Ok(()) => "enabled".to_string(),
                Err(why) => format!("off: {why}"),
            };
            self.inner.stats_json(&pt)
        } else if name == CACHED_XATTR {
            match self.inner.node(ino) {
                Ok(n) if !n.meta.is_dir => {
                    let cached = self.inner.engine.store().cached_bytes(&FileVersion {
                        path: n.path,
                        version: n.meta.version,
                        size: n.meta.size,
                    });
                    format!(r#"{{"size":{},"cached":{cached}}}"#, n.meta.size).into_bytes()
                }
                _ => return reply.error(Errno::ENODATA),
            }
        } else {
            return reply.error(Errno::ENODATA);
        };
        if size == 0 {
            reply.size(data.len() as u32);
        } else if (size as usize) < data.len() {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(&data);
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names: &[u8] = match self.inner.node(ino) {
            _ if ino.0 == ROOT => b"user.modelfs.stats\0",
            Ok(n) if !n.meta.is_dir => b"user.modelfs.cached\0",
            _ => b"",
        };
        if size == 0 {
            reply.size(names.len() as u32);
        } else if (size as usize) < names.len() {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(names);
        }
    }
}
