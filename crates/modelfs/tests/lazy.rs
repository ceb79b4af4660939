//! Prefetch that follows the tensors of a safetensors file: a reader's miss
//! inside a tensor brings the rest of that tensor, and a lazy load in random
//! tensor order through mmap reads every byte right without fetching any
//! twice.
mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use safetensors::tensor::{Dtype, TensorView};

const MIB: usize = 1 << 20;

/// Writes `tensors` (name, bytes) as U8 tensors; returns the file's bytes.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<u8>)]) -> Vec<u8> {
    let views: BTreeMap<_, _> = tensors
        .iter()
        .map(|(n, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::U8, vec![b.len()], b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(&views, None, path).unwrap();
    std::fs::read(path).unwrap()
}

/// Reads `range` of the mounted file with the kernel's readahead off, so
/// the mount sees these reads and no others; checks them against `want`.
fn read_exactly(f: &File, want: &[u8], range: std::ops::Range<usize>) {
    let mut buf = vec![0u8; range.len()];
    f.read_exact_at(&mut buf, range.start as u64).unwrap();
    assert!(buf == want[range.clone()], "bytes {range:?} differ");
}

/// Waits for prefetch to have filled its window, with `origin` bytes fetched
/// in all.
fn settle(m: &Mount, window: u64, origin: usize) {
    wait_until(
        "prefetch to fill its window",
        Duration::from_secs(30),
        || {
            let s = m.stats();
            s["prefetch_bytes_unread"] == window && s["bytes_from_source"] == origin as u64
        },
    );
}

#[test]
fn a_miss_inside_a_tensor_prefetches_the_whole_tensor_first() {
    let w = Work::new();
    // With 1 MiB chunks: ten 1 MiB tensors (chunks 0-10, the header in
    // chunk 0), one of 8 MiB (chunks 10-18), then six more 1 MiB ones.
    let mut tensors: Vec<(String, Vec<u8>)> = (0..10)
        .map(|k| (format!("a.{k:02}"), pattern(MIB, k)))
        .collect();
    tensors.push(("b.big".into(), pattern(8 * MIB, 99)));
    tensors.extend((0..6).map(|k| (format!("c.{k:02}"), pattern(MIB, 100 + k))));
    let want = write_safetensors(&w.src().join("model.safetensors"), &tensors);
    let chunk = |i: usize| i * MIB..((i + 1) * MIB).min(want.len());
    let window = 4 * MIB as u64;
    let m = w.mount(&[
        "--chunk-size",
        "1MiB",
        "--cache-size",
        "64MiB",
        "--prefetch-window",
        "4MiB",
        // One chunk at a time, so that the window fills with chunks 1-4.
        "--prefetch-concurrency",
        "1",
    ]);
    let f = File::open(m.path("model.safetensors")).unwrap();
    // SAFETY: advisory call on an fd we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    // A loader reads the header, then (the window now full of chunks 1-4)
    // the big tensor from its middle to its end.
    read_exactly(&f, &want, chunk(0));
    settle(&m, window, 5 * MIB);
    for i in 14..=18 {
        read_exactly(&f, &want, chunk(i));
    }
    // Reading chunks 1-4 makes room for four: prefetch spends it on the
    // rest of the tensor the reader is in (chunks 10-13), not on the chunks
    // after the last miss (19-22).
    for i in 1..=4 {
        read_exactly(&f, &want, chunk(i));
    }
    settle(&m, window, 14 * MIB);
    let before = m.stat_u64("bytes_from_cache");
    for i in 10..=13 {
        read_exactly(&f, &want, chunk(i));
    }
    assert_eq!(
        m.stat_u64("bytes_from_cache") - before,
        4 * MIB as u64,
        "the start of the tensor was not prefetched: {}",
        m.stats()
    );
    // Everything, once: nothing was fetched twice.
    drop_page_cache(&m.path("model.safetensors"));
    read_exactly(&f, &want, 0..want.len());
    assert_eq!(
        m.stat_u64("bytes_from_source"),
        want.len() as u64,
        "{}",
        m.stats()
    );
}

/// A xorshift shuffle: the same order every run.
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

#[test]
fn a_lazy_load_in_random_tensor_order_reads_every_tensor_right_and_each_byte_once() {
    let w = Work::new();
    w.synth("96MiB", 3);
    // The cache holds two shards of three, with a 16 MiB prefetch window.
    let m = w.mount(&["--cache-size", "80MiB", "--prefetch-window", "16MiB"]);
    let mut shards: Vec<_> = std::fs::read_dir(w.src())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    shards.sort();
    assert_eq!(shards.len(), 3);
    let mut model = 0;
    for (k, name) in shards.iter().enumerate() {
        let (fa, fb) = (
            File::open(w.src().join(name)).unwrap(),
            File::open(m.path(name)).unwrap(),
        );
        model += fa.metadata().unwrap().len();
        // SAFETY: read-only maps of files nobody writes during the test.
        let (ma, mb) = unsafe {
            (
                memmap2::Mmap::map(&fa).unwrap(),
                memmap2::Mmap::map(&fb).unwrap(),
            )
        };
        let a = safetensors::SafeTensors::deserialize(&ma).unwrap();
        let b = safetensors::SafeTensors::deserialize(&mb).unwrap();
        let mut names = a.names();
        assert_eq!(names.len(), b.names().len());
        shuffle(&mut names, k as u64 + 7);
        for n in names {
            let (t, u) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
            assert_eq!((t.dtype(), t.shape()), (u.dtype(), u.shape()), "{n}");
            assert!(t.data() == u.data(), "{name}:{n} differs");
        }
    }
    // Each shard fits the cache and is read while it is open: prefetch may
    // fetch the rest of a shard, but no chunk twice and nothing beyond.
    let origin = m.stat_u64("bytes_from_source");
    assert!(
        origin <= model,
        "origin sent {origin} bytes for a {model}-byte model: {}",
        m.stats()
    );
}
