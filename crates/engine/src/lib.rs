//! The modelfs engine: sources, the chunk cache and the read path.
//!
//! It knows nothing of FUSE: the mount is one front end over [`Engine`], a
//! warm-up server can be another.

pub mod buf;
pub mod cache;
pub mod engine;
pub mod error;
pub mod layout;
pub mod namespace;
pub mod peer;
pub mod prefetch;
pub mod push;
pub mod singleflight;
pub mod size;
pub mod source;
pub mod stats;
pub mod tier;
mod verify;

pub use engine::{Engine, EngineConfig, OpenFile};
pub use error::{Error, Result};
pub use source::{DirEntry, FileVersion, ObjectMeta, Sink, Source};
