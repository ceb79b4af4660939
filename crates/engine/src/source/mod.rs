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
}

/// Joins a directory and a name into a source path.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}
