//! A chunk written into its cache file piece by piece as a tier streams it,
//! so an object store's body is copied once, from the socket's buffers into
//! the cache, instead of joined in a buffer and copied again.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::disk::Files;
use super::store::Reservation;
use crate::source::Sink;

/// Holds the chunk's room until it is committed; dropped unfinished (the
/// source failed), it frees what it wrote, then the room.
pub struct ChunkWriter {
    reservation: Option<Reservation>,
    files: Arc<Files>,
    range: Range<u64>,
    written: u64,
    crc: u32,
    to: To,
    finished: bool,
}

enum To {
    File,
    /// A write to the cache failed: the bytes so far were moved to memory,
    /// so the waiters are still served, and the rest go there too.
    Memory(Vec<u8>, io::Error),
    /// Neither: the bytes written could not be read back either.
    Nowhere(io::Error),
}

pub(super) enum Written {
    InFile {
        files: Arc<Files>,
        range: Range<u64>,
        crc: u32,
    },
    InMemory(Bytes, io::Error),
    Lost(io::Error),
}

impl ChunkWriter {
    pub(super) fn new(r: Reservation, files: Arc<Files>, range: Range<u64>) -> ChunkWriter {
        ChunkWriter {
            reservation: Some(r),
            files,
            range,
            written: 0,
            crc: 0,
            to: To::File,
            finished: false,
        }
    }

    /// Whether the whole chunk has been put.
    pub(super) fn complete(&self) -> bool {
        self.written == self.range.end - self.range.start
    }

    /// The chunk's room and the chunk, put whole (see [`Self::complete`]).
    pub(super) fn finish(mut self) -> (Reservation, Written) {
        debug_assert!(self.complete());
        self.finished = true;
        let r = self.reservation.take().expect("finished once");
        let written = match std::mem::replace(&mut self.to, To::File) {
            To::File => Written::InFile {
                files: self.files.clone(),
                range: self.range.clone(),
                crc: self.crc,
            },
            To::Memory(bytes, err) => Written::InMemory(Bytes::from(bytes), err),
            To::Nowhere(err) => Written::Lost(err),
        };
        (r, written)
    }

    /// Moves what was written so far out of the file and into memory.
    fn fall_back(&mut self, err: io::Error) -> To {
        let mut kept = Vec::with_capacity((self.range.end - self.range.start) as usize);
        let to = match crate::buf::pread_into(
            &self.files.data,
            &mut kept,
            self.written as usize,
            self.range.start,
        ) {
            Ok(()) => To::Memory(kept, err),
            Err(e) => To::Nowhere(e),
        };
        // Nothing of the chunk stays in the file, whose filesystem is full.
        let _ = self.files.punch(self.range.clone());
        to
    }
}

impl Sink for ChunkWriter {
    fn put(&mut self, bytes: &[u8]) {
        let room = (self.range.end - self.range.start - self.written) as usize;
        // The source stops at the length it asked for; more is its error.
        let bytes = &bytes[..bytes.len().min(room)];
        if let To::File = self.to {
            if let Err(err) = self.files.write_at(bytes, self.range.start + self.written) {
                self.to = self.fall_back(err);
            }
        }
        if let To::Memory(kept, _) = &mut self.to {
            kept.extend_from_slice(bytes);
        }
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.written += bytes.len() as u64;
    }

    fn written(&self) -> u64 {
        self.written
    }
}

impl Drop for ChunkWriter {
    /// A chunk not finished (the source failed) leaves no blocks behind;
    /// its room goes after them (the field drops after this).
    fn drop(&mut self) {
        if !self.finished && self.written > 0 {
            let _ = self.files.punch(self.range.clone());
        }
    }
}
