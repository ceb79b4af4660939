//! Where the tensors of a weights file lie, from its header (safetensors or
//! GGUF), so that prefetch can fetch the tensor a reader is in rather than
//! chase its page faults. A header that is not one of these, or that lies
//! (offsets beyond the file, overlaps, absurd counts), is no layout: prefetch
//! then goes by chunks alone, so a wrong answer here costs speed, never bytes.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The most header read to find a layout (the safetensors spec's own limit on
/// its header); a larger one is no layout rather than unbounded memory.
pub const MAX_HEADER: u64 = 100 << 20;

/// The tensors' byte ranges in the file, sorted, not overlapping, non-empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    tensors: Vec<Range<u64>>,
}

/// What a prefix of a file says about its layout.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Layout(Layout),
    /// The header goes on past the prefix: ask again with at least this many
    /// bytes (never more than `MAX_HEADER` nor the file).
    More(u64),
    Unknown,
}

impl Layout {
    pub fn tensors(&self) -> &[Range<u64>] {
        &self.tensors
    }

    /// The tensor holding byte `offset`, if any (headers and padding hold none).
    pub fn tensor_at(&self, offset: u64) -> Option<Range<u64>> {
        let i = self.tensors.partition_point(|t| t.end <= offset);
        self.tensors.get(i).filter(|t| t.start <= offset).cloned()
    }

    /// Sorts `ranges`; none may be empty-and-duplicated, overlap, or end past
    /// `file_size`. Empty tensors hold no bytes and are dropped.
    fn new(mut ranges: Vec<Range<u64>>, file_size: u64) -> Option<Layout> {
        ranges.retain(|r| r.start != r.end);
        ranges.sort_by_key(|r| r.start);
        let sane = ranges.iter().all(|r| r.start < r.end && r.end <= file_size)
            && ranges.windows(2).all(|w| w[0].end <= w[1].start);
        (sane && !ranges.is_empty()).then_some(Layout { tensors: ranges })
    }
}

/// The layout of a file of `file_size` bytes whose first bytes are `prefix`.
pub fn parse(prefix: &[u8], file_size: u64) -> Parsed {
    if prefix.starts_with(b"GGUF") {
        gguf(prefix, file_size)
    } else {
        safetensors(prefix, file_size)
    }
}

/// Bytes of the prefix to ask for after `have` fell short, or `Unknown` when
/// no more may be read.
fn more(need: u64, have: usize, file_size: u64) -> Parsed {
    let limit = (MAX_HEADER + 8).min(file_size);
    if need > limit || have as u64 >= limit {
        Parsed::Unknown
    } else {
        Parsed::More(need)
    }
}

#[derive(Deserialize)]
struct StInfo {
    data_offsets: (u64, u64),
}

/// An 8-byte little-endian header length, the JSON header, then the data;
/// `data_offsets` are relative to the end of the header.
fn safetensors(prefix: &[u8], file_size: u64) -> Parsed {
    let Some(len) = prefix.get(..8) else {
        return more(8, prefix.len(), file_size);
    };
    let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    if n > MAX_HEADER || n + 8 > file_size {
        return Parsed::Unknown;
    }
    let end = n + 8;
    let Some(json) = prefix.get(8..end as usize) else {
        return more(end, prefix.len(), file_size);
    };
    if json.first() != Some(&b'{') {
        return Parsed::Unknown;
    }
    // Values stay unparsed slices of the header: a `Value` tree of a 100 MiB
    // hostile header (`[0,0,...]`) would take gigabytes.
    let Ok(map) = serde_json::from_slice::<BTreeMap<String, &RawValue>>(json) else {
        return Parsed::Unknown;
    };
    let mut ranges = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let Ok(StInfo {
            data_offsets: (a, b),
        }) = serde_json::from_str::<StInfo>(v.get())
        else {
            return Parsed::Unknown;
        };
        match (end.checked_add(a), end.checked_add(b)) {
            (Some(a), Some(b)) if a <= b => ranges.push(a..b),
            _ => return Parsed::Unknown,
        }
    }
    Layout::new(ranges, file_size).map_or(Parsed::Unknown, Parsed::Layout)
}

/// Reads little-endian fields of a GGUF header; `None` is "ran out of bytes".
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: u64) -> Option<&[u8]> {
        let end = self.at.checked_add(usize::try_from(n).ok()?)?;
        let s = self.buf.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<&[u8]> {
        let n = self.u64()?;
        self.take(n)
    }
}

/// Why a GGUF header could not be read from the prefix.
enum Stop {
    Short,
    Bad,
}

fn short<T>(o: Option<T>) -> Result<T, Stop> {
    o.ok_or(Stop::Short)
}

const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;
/// Arrays of arrays are legal; a header nesting deeper than this is hostile.
const MAX_NESTING: u32 = 4;

fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Skips one metadata value of type `ty`; returns it if it is an integer
/// (which is all `general.alignment` may be).
fn value(r: &mut Reader, ty: u32, depth: u32) -> Result<Option<u64>, Stop> {
    if let Some(size) = scalar_size(ty) {
        let b = short(r.take(size))?;
        let mut v = [0u8; 8];
        v[..b.len()].copy_from_slice(b);
        let int = !matches!(ty, 6 | 7 | 12);
        return Ok(int.then_some(u64::from_le_bytes(v)));
    }
    match ty {
        GGUF_STRING => short(r.string()).map(|_| None),
        GGUF_ARRAY if depth < MAX_NESTING => {
            let (ety, count) = (short(r.u32())?, short(r.u64())?);
            if let Some(size) = scalar_size(ety) {
                short(r.take(count.checked_mul(size).ok_or(Stop::Bad)?))?;
            } else {
                // Every element takes at least 8 bytes: a count that could not
                // fit in the file is a lie, not a reason to loop for ages.
                if count > (r.buf.len() - r.at) as u64 / 8 {
                    return Err(Stop::Short);
                }
                for _ in 0..count {
                    value(r, ety, depth + 1)?;
                }
            }
            Ok(None)
        }
        _ => Err(Stop::Bad),
    }
}

/// Magic, version (2 or 3), tensor and metadata counts, the metadata, then
/// each tensor's name, dimensions, type and offset from the start of the
/// data, which begins at the header's end rounded up to `general.alignment`.
fn gguf(prefix: &[u8], file_size: u64) -> Parsed {
    match gguf_tensors(prefix, file_size) {
        Ok(ranges) => Layout::new(ranges, file_size).map_or(Parsed::Unknown, Parsed::Layout),
        Err(Stop::Short) => {
            let need = (prefix.len() as u64).saturating_mul(2).max(1 << 20);
            more(
                need.min(MAX_HEADER + 8).min(file_size),
                prefix.len(),
                file_size,
            )
        }
        Err(Stop::Bad) => Parsed::Unknown,
    }
}

fn gguf_tensors(prefix: &[u8], file_size: u64) -> Result<Vec<Range<u64>>, Stop> {
    let mut r = Reader { buf: prefix, at: 4 };
    if !matches!(short(r.u32())?, 2 | 3) {
        return Err(Stop::Bad);
    }
    let (tensors, kvs) = (short(r.u64())?, short(r.u64())?);
    // Each tensor info and each key-value takes at least 24 and 12 bytes.
    if tensors > file_size / 24 || kvs > file_size / 12 {
        return Err(Stop::Bad);
    }
    let mut alignment = 32;
    for _ in 0..kvs {
        let key = short(r.string())?;
        let is_alignment = key == b"general.alignment";
        let ty = short(r.u32())?;
        if let Some(v) = value(&mut r, ty, 0)? {
            if is_alignment {
                alignment = v;
            }
        }
    }
    if alignment == 0 || alignment > 1 << 30 {
        return Err(Stop::Bad);
    }
    let mut offsets = Vec::new();
    for _ in 0..tensors {
        short(r.string())?;
        let dims = short(r.u32())?;
        if dims > 8 {
            return Err(Stop::Bad);
        }
        short(r.take(u64::from(dims) * 8 + 4))?;
        offsets.push(short(r.u64())?);
    }
    let data = (r.at as u64).div_ceil(alignment) * alignment;
    offsets.sort_unstable();
    if offsets.windows(2).any(|w| w[0] == w[1]) {
        return Err(Stop::Bad);
    }
    // Sizes would need every ggml type's block size: each tensor runs to the
    // next one (or the end of the file), padding included, which is as good
    // for prefetch and cannot overlap.
    let mut ranges = Vec::with_capacity(offsets.len());
    for (k, &o) in offsets.iter().enumerate() {
        let start = data.checked_add(o).ok_or(Stop::Bad)?;
        let end = match offsets.get(k + 1) {
            Some(&next) => data.checked_add(next).ok_or(Stop::Bad)?,
            None => file_size,
        };
        if start >= end || end > file_size {
            return Err(Stop::Bad);
        }
        ranges.push(start..end);
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests;
