//! Where model files come from. A source lists, stats and reads ranges of one
//! version of a file; it never returns bytes of a version other than the one
//! asked for.

mod opendal;
mod uri;

use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

pub use self::opendal::OpendalSource;
pub use self::uri::{open_source, operator, SourceOptions};
use crate::Result;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub is_dir: bool,
    pub size: u64,
    pub mtime: SystemTime,
    /// ETag or object version where the source has one, else mtime and size.
    pub version: String,
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: String,
    pub meta: ObjectMeta,
}

/// One version of one file: the unit the cache keys chunks by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileVersion {
    /// Relative to the source root, without a leading slash.
    pub path: String,
    pub version: String,
    pub size: u64,
}

#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// A stable name for the source (its URL): chunks of two sources never mix.
    fn id(&self) -> &str;
    /// The entries directly under `dir` ("" is the root).
    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>>;
    /// Fresh metadata for `path`, bypassing any listing.
    async fn stat(&self, path: &str) -> Result<ObjectMeta>;
    /// Bytes `range` of `file`; `Error::VersionChanged` if the object is no
    /// longer that version.
    async fn read(&self, file: &FileVersion, range: Range<u64>) -> Result<Bytes>;
    /// Whether [`Source::read_to`] hands over a body in pieces as it
    /// arrives (an object store's) rather than whole (a file's, which
    /// gains nothing from it).
    fn streams(&self) -> bool {
        false
    }
    /// As [`Source::read`], each piece handed to `sink` as it arrives: a
    /// body streamed from an object store then goes straight into the cache
    /// file instead of being joined in a buffer first. On an error, what
    /// the sink got is to be thrown away.
    async fn read_to(
        &self,
        file: &FileVersion,
        range: Range<u64>,
        sink: &mut (dyn Sink + Send),
    ) -> Result<()> {
        let b = self.read(file, range).await?;
        sink.put(&b);
        Ok(())
    }
}

/// Where [`Source::read_to`] puts the bytes, in order.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
    /// Bytes put so far.
    fn written(&self) -> u64;
}

/// Joins a directory and a name into a source path.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}
