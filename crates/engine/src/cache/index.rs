//! The on-disk index beside each cache data file: a header naming the file
//! version, then one 8-byte entry per chunk (crc32c, present flag). An entry is
//! written only after its chunk's bytes, so an index never claims bytes that
//! were not written; a torn write is caught by the crc on first use.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use crate::FileVersion;

const MAGIC: &[u8; 8] = b"MFSIDX01";
const ENTRY: u64 = 8;
const PRESENT: u32 = 1;

pub struct Header {
    pub chunk_size: u64,
    pub file: FileVersion,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.file.path.len() + self.file.version.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&self.file.size.to_le_bytes());
        for s in [&self.file.path, &self.file.version] {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        b
    }

    fn len(&self) -> u64 {
        self.encode().len() as u64
    }
}

pub struct Index {
    file: File,
    entries_at: u64,
}

/// A chunk the index says is present, with its crc32c.
pub type Present = (u64, u32);

impl Index {
    pub fn create(file: File, header: &Header) -> io::Result<Index> {
        let h = header.encode();
        file.set_len(0)?;
        file.write_all_at(&h, 0)?;
        Ok(Index {
            file,
            entries_at: h.len() as u64,
        })
    }

    /// An index this process wrote with `header`, opened again without
    /// reading its entries (the registry holds them).
    pub fn attach(file: File, header: &Header) -> Index {
        Index {
            file,
            entries_at: header.len(),
        }
    }

    /// Reads an index back; `None` if it is not one of ours.
    pub fn load(mut file: File) -> io::Result<Option<(Index, Header, Vec<Present>)>> {
        let mut raw = Vec::new();
        file.read_to_end(&mut raw)?;
        let Some(header) = parse_header(&raw) else {
            return Ok(None);
        };
        let at = header.len() as usize;
        let n = header.file.size.div_ceil(header.chunk_size);
        let mut present = Vec::new();
        for i in 0..n {
            let off = at + (i * ENTRY) as usize;
            let Some(e) = raw.get(off..off + ENTRY as usize) else {
                break;
            };
            let crc = u32::from_le_bytes(e[0..4].try_into().unwrap());
            let flags = u32::from_le_bytes(e[4..8].try_into().unwrap());
            if flags == PRESENT {
                present.push((i, crc));
            }
        }
        Ok(Some((
            Index {
                file,
                entries_at: at as u64,
            },
            header,
            present,
        )))
    }

    pub fn set(&self, index: u64, crc: Option<u32>) -> io::Result<()> {
        let mut e = [0u8; ENTRY as usize];
        if let Some(crc) = crc {
            e[0..4].copy_from_slice(&crc.to_le_bytes());
            e[4..8].copy_from_slice(&PRESENT.to_le_bytes());
        }
        self.file.write_all_at(&e, self.entries_at + index * ENTRY)
    }
}

fn parse_header(raw: &[u8]) -> Option<Header> {
    let mut at = 0usize;
    let mut take = |n: usize| {
        let s = raw.get(at..at + n)?;
        at += n;
        Some(s)
    };
    if take(8)? != MAGIC {
        return None;
    }
    let chunk_size = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let size = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let mut strings = Vec::new();
    for _ in 0..2 {
        let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        strings.push(String::from_utf8(take(n)?.to_vec()).ok()?);
    }
    if chunk_size == 0 {
        return None;
    }
    let version = strings.pop()?;
    let path = strings.pop()?;
    Some(Header {
        chunk_size,
        file: FileVersion {
            path,
            version,
            size,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.idx");
        let header = Header {
            chunk_size: 4,
            file: FileVersion {
                path: "a/b.safetensors".into(),
                version: "etag:\"abc\"".into(),
                size: 10,
            },
        };
        let f = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let idx = Index::create(f, &header).unwrap();
        idx.set(0, Some(0xdead_beef)).unwrap();
        idx.set(2, Some(7)).unwrap();
        idx.set(1, Some(9)).unwrap();
        idx.set(1, None).unwrap();
        let (_, h, present) = Index::load(File::open(&p).unwrap()).unwrap().unwrap();
        assert_eq!(h.file, header.file);
        assert_eq!(h.chunk_size, 4);
        assert_eq!(present, vec![(0, 0xdead_beef), (2, 7)]);

        std::fs::write(&p, b"not an index at all").unwrap();
        assert!(Index::load(File::open(&p).unwrap()).unwrap().is_none());
    }
}
