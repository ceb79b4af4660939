//! Chunk buffers on their way from a tier to the cache, reused: a fresh
//! buffer costs a page fault per 4 KiB the first time it is written, which
//! for 8 MiB chunks is as much CPU as copying the chunk. Bytes are read into
//! a buffer's spare capacity, never zero-filled first.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

/// Idle buffers kept for reuse, and their total capacity.
static IDLE: Mutex<(Vec<Vec<u8>>, usize)> = Mutex::new((Vec::new(), 0));
/// Most idle bytes kept; what the engine may have in flight, so the pool
/// never holds more than one load's worth of buffers.
static IDLE_LIMIT: AtomicUsize = AtomicUsize::new(0);

/// Keeps up to `bytes` of idle buffers (the largest asked of any engine).
pub fn keep_idle(bytes: usize) {
    IDLE_LIMIT.fetch_max(bytes, Ordering::Relaxed);
}

/// Buffers taken so far: the trimmer frees the idle ones once this stops
/// moving.
static TAKEN: AtomicU64 = AtomicU64::new(0);
static TRIMMER: AtomicBool = AtomicBool::new(false);
const TRIM_AFTER: Duration = Duration::from_secs(10);
const MIN_POOLED: usize = 1 << 20;

/// Once nothing has been fetched for a while, gives the idle buffers and
/// what the allocator kept of freed ones back to the system: a loaded model
/// should not leave the inference server's host a load's worth poorer.
fn start_trimmer() {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if TRIMMER.swap(true, Ordering::Relaxed) {
        return;
    }
    rt.spawn(async {
        let (mut seen, mut trimmed) = (TAKEN.load(Ordering::Relaxed), false);
        loop {
            tokio::time::sleep(TRIM_AFTER).await;
            let now = TAKEN.load(Ordering::Relaxed);
            if now != seen {
                (seen, trimmed) = (now, false);
            } else if !trimmed {
                drop(std::mem::take(&mut *IDLE.lock()));
                // SAFETY: glibc's malloc_trim only returns free memory of
                // its arenas to the system.
                unsafe { libc::malloc_trim(0) };
                trimmed = true;
            }
        }
    });
}

/// An empty buffer of at least `cap` bytes' capacity.
pub fn take(cap: usize) -> Vec<u8> {
    TAKEN.fetch_add(1, Ordering::Relaxed);
    start_trimmer();
    let mut idle = IDLE.lock();
    // A buffer far larger than asked would hold memory the budget does not
    // count: only one of at most twice the size is reused.
    if let Some(at) = idle
        .0
        .iter()
        .position(|v| v.capacity() >= cap && v.capacity() / 2 <= cap)
    {
        let v = idle.0.swap_remove(at);
        idle.1 -= v.capacity();
        return v;
    }
    drop(idle);
    let mut v = Vec::with_capacity(cap);
    if cap >= MIN_POOLED {
        advise_huge(&mut v);
    }
    v
}

/// Asks for transparent huge pages under a fresh buffer (THP's `madvise`
/// mode, a common default): its first fill then faults once per 2 MiB
/// instead of once per 4 KiB, which for the first window of a load cost as
/// much CPU as the copy itself. The buffer is filled whole, so no memory is
/// wasted; without THP the call does nothing.
fn advise_huge(v: &mut Vec<u8>) {
    const HUGE: usize = 2 << 20;
    let start = v.as_mut_ptr() as usize;
    let (from, to) = (
        start.next_multiple_of(HUGE),
        (start + v.capacity()) / HUGE * HUGE,
    );
    if from < to {
        // SAFETY: the range lies inside memory this Vec owns; MADV_HUGEPAGE
        // only changes how it is backed, never its contents.
        unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
    }
}

/// `v` as Bytes that give the buffer back for reuse when the last clone goes.
pub fn freeze(v: Vec<u8>) -> Bytes {
    Bytes::from_owner(Recycled(v))
}

struct Recycled(Vec<u8>);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.0);
        v.clear();
        // Small buffers (pieces read past a full cache) are cheap to make
        // and would crowd the pool.
        if v.capacity() < MIN_POOLED {
            return;
        }
        let mut idle = IDLE.lock();
        if idle.1 + v.capacity() <= IDLE_LIMIT.load(Ordering::Relaxed) {
            idle.1 += v.capacity();
            idle.0.push(v);
        }
    }
}

/// Appends exactly `len` bytes of `file` at `offset` to `buf`, reading into
/// its spare capacity. A file shorter than that is an `UnexpectedEof`.
pub fn pread_into(file: &File, buf: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
    pread_blocks(file, buf, len, offset, 1)
}

/// As [`pread_into`], for a file opened with O_DIRECT (`buf`'s end, `len`
/// and `offset` aligned to `block`). A read that ends off a block boundary
/// leaves the next one unaligned, which O_DIRECT would refuse: the file
/// ended there, or (a FUSE NAS mounted with direct_io, SMB) the filesystem
/// answered short, so the rest is read without O_DIRECT.
pub fn pread_blocks(
    file: &File,
    buf: &mut Vec<u8>,
    len: usize,
    offset: u64,
    mut block: usize,
) -> io::Result<()> {
    buf.reserve(len);
    let mut done = 0;
    while done < len {
        let spare = &mut buf.spare_capacity_mut()[..len - done];
        // SAFETY: the kernel writes at most `spare.len()` bytes into memory
        // we own and may write; they are counted as initialised only below,
        // for as many as it says it wrote.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{done} of {len} bytes at {offset}: the file ends there"),
                ))
            }
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            n => {
                // SAFETY: the kernel initialised these `n` bytes.
                unsafe { buf.set_len(buf.len() + n as usize) };
                done += n as usize;
                if done < len && !(n as usize).is_multiple_of(block) {
                    clear_direct(file)?;
                    block = 1;
                }
            }
        }
    }
    Ok(())
}

fn clear_direct(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on a descriptor we own change only its
    // status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pread_into_appends_exactly_the_range_and_reports_a_short_file() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        f.write_all(&data).unwrap();
        let mut buf = b"ab".to_vec();
        pread_into(&f, &mut buf, 5000, 4093).unwrap();
        assert_eq!(&buf[..2], b"ab");
        assert_eq!(&buf[2..], &data[4093..9093]);
        let mut buf = take(4096);
        let e = pread_into(&f, &mut buf, 4096, 8000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_recycled_buffer_comes_back_empty() {
        keep_idle(4 << 20);
        let mut v = take(1 << 20);
        v.extend_from_slice(&[7; 1 << 20]);
        let b = freeze(v);
        let c = b.slice(10..20);
        drop(b);
        assert_eq!(&c[..], &[7; 10]);
        drop(c);
        let v = take(1 << 20);
        assert!(v.is_empty() && v.capacity() >= 1 << 20);
    }
}
