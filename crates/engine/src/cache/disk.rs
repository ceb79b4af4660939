//! One version of one source file on disk: a sparse data file the size of
//! the source file and its index. Opened only while someone uses it, so a
//! cache of many files does not hold a descriptor per file.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use bytes::Bytes;

use super::dir::CacheDir;
use super::index::{Header, Index, Present};

pub struct Files {
    pub data: File,
    index: Index,
}

pub fn data_name(key: u128) -> String {
    format!("{key:032x}.data")
}

pub fn index_name(key: u128) -> String {
    format!("{key:032x}.idx")
}

/// Unlinks both files; a process that maps the data file keeps its bytes.
pub fn remove(dir: &CacheDir, key: u128) {
    dir.remove(&index_name(key));
    dir.remove(&data_name(key));
}

impl Files {
    pub fn create(dir: &CacheDir, key: u128, header: &Header) -> io::Result<Files> {
        let made = (|| {
            let data = dir.create_file(&data_name(key))?;
            data.set_len(header.file.size)?;
            let index = Index::create(dir.create_file(&index_name(key))?, header)?;
            Ok(Files { data, index })
        })();
        if made.is_err() {
            remove(dir, key);
        }
        made
    }

    /// Opens the files of `key` and what their index says; `None` if they
    /// are missing, not ours, or do not match each other.
    pub fn open(dir: &CacheDir, key: u128) -> Option<(Files, Header, Vec<Present>)> {
        let (index, header, present) =
            Index::load(dir.open_file(&index_name(key)).ok()?).ok()??;
        let data = dir.open_file(&data_name(key)).ok()?;
        let meta = data.metadata().ok()?;
        if !meta.is_file() || meta.len() != header.file.size {
            return None;
        }
        Some((Files { data, index }, header, present))
    }

    /// Opens again the files of an entry the registry knows.
    pub fn reopen(dir: &CacheDir, key: u128, header: &Header) -> Option<Files> {
        let index = Index::attach(dir.open_file(&index_name(key)).ok()?, header);
        let data = dir.open_file(&data_name(key)).ok()?;
        let meta = data.metadata().ok()?;
        (meta.is_file() && meta.len() == header.file.size).then_some(Files { data, index })
    }

    pub fn read(&self, offset: u64, len: u64) -> io::Result<Bytes> {
        let mut buf = Vec::new();
        crate::buf::pread_into(&self.data, &mut buf, len as usize, offset)?;
        Ok(Bytes::from(buf))
    }

    /// `len` bytes at `offset` as a read-only mapping: a cache hit is then
    /// copied once, into the FUSE reply, instead of into a buffer first.
    /// `populate` reads the pages in at once, for a reply sent now; without
    /// it a page costs nothing until touched (a chunk just fetched, which
    /// prefetch's flight maps for waiters it may not have).
    pub fn map(&self, offset: u64, len: u64, populate: bool) -> io::Result<memmap2::Mmap> {
        let mut opts = memmap2::MmapOptions::new();
        opts.offset(offset).len(len as usize);
        if populate {
            opts.populate();
        }
        // SAFETY: the caller keeps the chunk pinned while the mapping lives,
        // and a pinned chunk is never punched or rewritten; a data file is
        // never truncated (a retired one is unlinked and keeps its pages).
        unsafe { opts.map(&self.data) }
    }

    /// Writes a chunk, then its index entry, so the index never claims bytes
    /// that are not there. A failed write leaves no allocated bytes behind.
    pub fn write_chunk(&self, i: u64, range: Range<u64>, bytes: &[u8], crc: u32) -> io::Result<()> {
        let r = self
            .data
            .write_all_at(bytes, range.start)
            .and_then(|()| self.index.set(i, Some(crc)));
        if r.is_err() {
            let _ = self.unwrite(i, range);
        }
        r
    }

    /// Writes part of a chunk; the chunk is not in the index until
    /// [`Self::index_chunk`].
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.data.write_all_at(bytes, offset)
    }

    /// Records chunk `i`, written whole, in the index.
    pub fn index_chunk(&self, i: u64, crc: u32) -> io::Result<()> {
        self.index.set(i, Some(crc))
    }

    /// Undoes a chunk written (in part or whole): out of the index, then
    /// its blocks freed.
    pub fn unwrite(&self, i: u64, range: Range<u64>) -> io::Result<()> {
        let _ = self.index.set(i, None);
        self.punch(range)
    }

    /// Forgets chunk `i` in the index, then frees its blocks.
    pub fn evict(&self, i: u64, range: Range<u64>) -> io::Result<()> {
        self.index.set(i, None)?;
        self.punch(range)
    }

    pub(super) fn punch(&self, range: Range<u64>) -> io::Result<()> {
        // SAFETY: fallocate on an fd we own; it only deallocates blocks and
        // keeps the file's size.
        let rc = unsafe {
            libc::fallocate(
                self.data.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                range.start as i64,
                (range.end - range.start) as i64,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
