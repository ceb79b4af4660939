use std::sync::Arc;

/// Errors are `Clone` because one failed fetch is handed to every reader that
/// joined it through single-flight.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{0}: no such file or directory in the source")]
    NotFound(String),
    #[error("{path}: the source changed (was version {expected}, now {found}); reopen the file to read the new version")]
    VersionChanged {
        path: String,
        expected: String,
        found: String,
    },
    #[error("{path}: source read failed: {msg}")]
    Source { path: String, msg: String },
    #[error("{path}: chunk {index} failed its crc32c check")]
    Corrupt { path: String, index: u64 },
    /// A tier that cannot answer this request: the next tier is asked.
    #[error("{0}")]
    Unavailable(String),
    /// A peer request that reached this node itself: that address is this
    /// node's own.
    #[error("{0} is this node itself")]
    ToSelf(String),
    /// A busy owner named members that hold the chunk instead of sending it.
    #[error("the owner is busy; {} members hold the chunk", .0.len())]
    Redirected(Vec<std::net::SocketAddr>),
    #[error("cache: {0}")]
    Cache(String),
    #[error("{0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<std::io::Error>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// The errno a file system front end should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound(_) => libc::ENOENT,
            Error::VersionChanged { .. } => libc::ESTALE,
            _ => libc::EIO,
        }
    }
}
