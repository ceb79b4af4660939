//! The chunk store on its own: accounting, eviction, restarts, and bytes
//! under a mapping that outlives its pin.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::FileVersion;

const CS: u64 = 4096;

fn fv(path: &str, size: u64) -> FileVersion {
    FileVersion {
        path: path.into(),
        version: "v1".into(),
        size,
    }
}

fn open(dir: &Path, capacity: u64, window: u64) -> crate::Result<Arc<ChunkStore>> {
    ChunkStore::open(
        CacheConfig {
            dir: dir.to_path_buf(),
            capacity,
            chunk_size: CS,
            source_id: "test".into(),
            prefetch_window: window,
        },
        Arc::default(),
    )
}

fn store(dir: &Path, capacity: u64) -> Arc<ChunkStore> {
    open(dir, capacity, u64::MAX).unwrap()
}

fn chunk(f: &CacheFile, i: u64) -> Vec<u8> {
    let seed = xxhash_rust::xxh3::xxh3_64(f.file.path.as_bytes());
    (0..f.chunk_len(i))
        .map(|b| (seed as u8) ^ (i as u8).wrapping_mul(31) ^ (b as u8))
        .collect()
}

/// Reserves and stores chunk `i`; `None` when there was no room.
fn put(s: &Arc<ChunkStore>, f: &CacheFile, i: u64, mode: Mode) -> Option<bool> {
    match s.reserve(f, i, mode) {
        Reserve::Room(r) => Some(s.commit(r, &chunk(f, i))),
        Reserve::Busy => Some(false),
        Reserve::NoRoom => None,
    }
}

fn evicted(s: &ChunkStore) -> u64 {
    s.stats.chunks_evicted.load(Relaxed)
}

#[test]
fn reads_back_what_was_stored() {
    let d = tempfile::tempdir().unwrap();
    let s = store(d.path(), 100 * CS);
    let f = s.file(&fv("a", 2 * CS + 10));
    assert_eq!(f.n_chunks(), 3);
    assert!(s.read(&f, 0, 0..4).is_none());
    for i in 0..3 {
        assert_eq!(put(&s, &f, i, Mode::Read), Some(true));
    }
    assert!(matches!(s.reserve(&f, 1, Mode::Read), Reserve::Busy));
    assert_eq!(&s.read(&f, 1, 1..3).unwrap()[..], &chunk(&f, 1)[1..3]);
    assert_eq!(&s.read_chunk(&f, 2).unwrap()[..], &chunk(&f, 2)[..]);
    assert_eq!(s.usage(), (2 * CS + 10, 3));
    let Reserve::Room(r) = s.reserve(&f, 0, Mode::Read) else {
        // Chunk 0 is present; reserving it again is refused.
        let g = s.file(&fv("b", CS));
        let Reserve::Room(r) = s.reserve(&g, 0, Mode::Read) else {
            panic!("room expected")
        };
        assert!(!s.commit(r, &[1, 2]), "a wrong length is refused");
        assert_eq!(s.usage(), (2 * CS + 10, 3), "and its room given back");
        return;
    };
    drop(r);
    panic!("chunk 0 was present");
}

#[test]
fn evicts_least_recently_used_and_respects_whole_pins() {
    let d = tempfile::tempdir().unwrap();
    let s = store(d.path(), 2 * CS);
    let f = s.file(&fv("a", 4 * CS));
    put(&s, &f, 0, Mode::Read).unwrap();
    put(&s, &f, 1, Mode::Read).unwrap();
    s.read(&f, 0, 0..4).unwrap(); // chunk 1 is now the oldest
    put(&s, &f, 2, Mode::Read).unwrap();
    assert!(s.contains(&f, 0) && !s.contains(&f, 1) && s.contains(&f, 2));
    assert_eq!((s.usage(), evicted(&s)), ((2 * CS, 2), 1));

    // Files pinned whole for passthrough cannot lose chunks.
    let b = s.file(&fv("b", CS));
    let c = s.file(&fv("c", CS));
    put(&s, &b, 0, Mode::Read).unwrap();
    put(&s, &c, 0, Mode::Read).unwrap();
    let pins = (s.pin_whole(&b).unwrap(), s.pin_whole(&c).unwrap());
    assert_eq!(put(&s, &f, 3, Mode::Read), None);
    assert!(s.contains(&b, 0) && s.contains(&c, 0));
    drop(pins);
    assert_eq!(put(&s, &f, 3, Mode::Read), Some(true));
    assert!(!s.contains(&b, 0), "b was the least recently used");
}

#[test]
fn prefetch_never_evicts_unread_chunks_and_stays_in_its_window() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 4 * CS, 2 * CS).unwrap();
    let f = s.file(&fv("a", 8 * CS));
    assert_eq!(put(&s, &f, 0, Mode::Prefetch), Some(true));
    assert_eq!(put(&s, &f, 1, Mode::Prefetch), Some(true));
    assert_eq!(put(&s, &f, 2, Mode::Prefetch), None, "the window is full");
    assert_eq!(s.pressure().1, 2 * CS);
    s.read(&f, 0, 0..4).unwrap();
    assert_eq!(put(&s, &f, 2, Mode::Prefetch), Some(true));
    s.mark_read(&f, 1);
    assert_eq!(put(&s, &f, 3, Mode::Prefetch), Some(true));
    // Full of chunks: 0 and 1 read, 2 and 3 not. Prefetch evicts only read ones.
    s.read(&f, 2, 0..4).unwrap();
    // LRU order is now 1, 0, 3, 2 (mark_read is no use).
    assert_eq!(put(&s, &f, 4, Mode::Prefetch), Some(true));
    assert!(!s.contains(&f, 1) && s.contains(&f, 0) && s.contains(&f, 3));
    assert_eq!(
        put(&s, &f, 5, Mode::Prefetch),
        None,
        "3 and 4 fill the window"
    );
    // A reader's miss may evict anything unpinned, read chunks first.
    assert_eq!(put(&s, &f, 6, Mode::Read), Some(true));
    assert!(!s.contains(&f, 0) && s.contains(&f, 3) && s.contains(&f, 4));
    assert_eq!(put(&s, &f, 7, Mode::Read), Some(true));
    assert!(!s.contains(&f, 2) && s.contains(&f, 3) && s.contains(&f, 4));
    let g = s.file(&fv("b", 4 * CS));
    for i in 0..4 {
        assert_eq!(put(&s, &g, i, Mode::Read), Some(true));
    }
    assert!(
        s.contains(&f, 3) && s.contains(&f, 4),
        "read chunks go first"
    );
    assert_eq!(s.usage(), (4 * CS, 4));

    // Unread ones go when nothing read is left (the rest being written).
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 4 * CS, 2 * CS).unwrap();
    let f = s.file(&fv("a", 8 * CS));
    put(&s, &f, 0, Mode::Prefetch).unwrap();
    put(&s, &f, 1, Mode::Prefetch).unwrap();
    let writing = [2, 3].map(|i| match s.reserve(&f, i, Mode::Read) {
        Reserve::Room(r) => r,
        _ => panic!("room for chunk {i}"),
    });
    assert_eq!(s.pressure().1, 2 * CS);
    assert_eq!(put(&s, &f, 4, Mode::Read), Some(true));
    assert!(!s.contains(&f, 0) && s.contains(&f, 1));
    assert_eq!(
        s.pressure().1,
        CS,
        "an unread chunk evicted is no longer counted"
    );
    drop(writing);
    assert_eq!(s.usage(), (2 * CS, 2));
}

#[test]
fn a_restart_reuses_chunks_and_drops_corrupt_ones() {
    let d = tempfile::tempdir().unwrap();
    let v = fv("m/model.safetensors", 3 * CS);
    {
        let s = store(d.path(), 100 * CS);
        let f = s.file(&v);
        for i in 0..3 {
            put(&s, &f, i, Mode::Read).unwrap();
        }
        let e = open(d.path(), 100 * CS, 0).err().unwrap();
        assert!(e.to_string().contains("in use by another modelfs"), "{e}");
    }
    let s = store(d.path(), 100 * CS);
    assert_eq!(s.usage(), (3 * CS, 3));
    let f = s.file(&v);
    // Corrupt chunk 1 on disk behind the store's back.
    let name = d.path().join(super::disk::data_name(f.key));
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(name).unwrap(),
        b"XXXX",
        CS,
    )
    .unwrap();
    assert_eq!(&s.read(&f, 0, 0..4).unwrap()[..], &chunk(&f, 0)[..4]);
    assert!(s.read(&f, 1, 0..4).is_none());
    assert_eq!(s.stats.crc_failures.load(Relaxed), 1);
    assert!(s.contains(&f, 0) && !s.contains(&f, 1));
    assert!(
        s.pin_whole(&f).is_none(),
        "a hole is never handed to passthrough"
    );
    assert_eq!(put(&s, &f, 1, Mode::Read), Some(true));
    assert_eq!(&s.read_chunk(&f, 1).unwrap()[..], &chunk(&f, 1)[..]);
    assert!(s.pin_whole(&f).is_some());

    let newer = s.file(&FileVersion {
        version: "v2".into(),
        ..v
    });
    assert!(
        !s.contains(&newer, 0),
        "another version is another cache file"
    );
}

#[test]
fn a_smaller_capacity_on_restart_evicts() {
    let d = tempfile::tempdir().unwrap();
    {
        let s = store(d.path(), 100 * CS);
        let f = s.file(&fv("a", 4 * CS + 1));
        for i in 0..4 {
            put(&s, &f, i, Mode::Read).unwrap();
        }
    }
    let s = store(d.path(), 2 * CS);
    assert_eq!(s.usage(), (2 * CS, 2));
}

#[test]
fn a_mapping_outlives_eviction_of_its_file() {
    let d = tempfile::tempdir().unwrap();
    let s = store(d.path(), 4 * CS);
    let f = s.file(&fv("mapped", 3 * CS));
    for i in 0..3 {
        put(&s, &f, i, Mode::Read).unwrap();
    }
    let want: Vec<u8> = (0..3).flat_map(|i| chunk(&f, i)).collect();
    let pin = s.pin_whole(&f).unwrap();
    // SAFETY: the store promises the file's bytes never change under a map.
    let map = unsafe { memmap2::Mmap::map(&pin.file).unwrap() };
    drop(pin);
    drop(f);
    // Fill the cache with another file twice over.
    let g = s.file(&fv("other", 8 * CS));
    for i in 0..8 {
        assert_eq!(put(&s, &g, i, Mode::Read), Some(true));
    }
    assert!(map[..] == want[..], "a live mapping changed under eviction");
    assert!(s.usage().0 <= 4 * CS);
    assert_eq!(s.retired_bytes(), 3 * CS, "the mapped file is reported");
    drop(map);
    assert_eq!(s.retired_bytes(), 0, "and forgotten once unmapped");
    // The next version of the file goes to a fresh data file.
    let f = s.file(&fv("mapped", 3 * CS));
    assert!(!s.contains(&f, 0));
    assert_eq!(put(&s, &f, 0, Mode::Read), Some(true));
    assert_eq!(&s.read_chunk(&f, 0).unwrap()[..], &chunk(&f, 0)[..]);
}

fn fds_in(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(dir)))
        .count()
}

#[test]
fn files_nobody_holds_are_closed_and_their_chunks_stay() {
    let d = tempfile::tempdir().unwrap();
    let s = store(d.path(), 1000 * CS);
    for n in 0..50 {
        let f = s.file(&fv(&format!("f{n}"), CS));
        put(&s, &f, 0, Mode::Read).unwrap();
    }
    assert_eq!(fds_in(d.path()), 2, "only the dir and its lock stay open");
    assert_eq!(s.usage(), (50 * CS, 50));
    let f = s.file(&fv("f7", CS));
    assert_eq!(&s.read_chunk(&f, 0).unwrap()[..], &chunk(&f, 0)[..]);
    drop(f);
    assert_eq!(fds_in(d.path()), 2);
    // Entries whose chunks are all evicted leave no files behind.
    drop(s);
    let s = store(d.path(), CS);
    assert_eq!(s.usage().1, 1);
    let names = std::fs::read_dir(d.path()).unwrap().count();
    assert_eq!(names, 3, ".lock, and one .data and .idx");
}

/// A tmpfs of `size` bytes mounted on a fresh dir, unmounted on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn new(size: u64) -> SmallFs {
        let d = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}")])
            .arg("tmpfs")
            .arg(d.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs (the tests run as root)");
        SmallFs(d)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_filesystem_shrinks_the_cache_instead_of_failing() {
    let fs = SmallFs::new(64 * CS);
    let dir = fs.0.path().join("cache");
    let e = open(&dir, 1000 * CS, u64::MAX).err().unwrap().to_string();
    assert!(
        e.contains("does not fit") && e.contains("--cache-size"),
        "{e}"
    );
    let s = store(&dir, 32 * CS);
    let f = s.file(&fv("a", 64 * CS));
    for i in 0..16 {
        assert_eq!(put(&s, &f, i, Mode::Read), Some(true));
    }
    // Someone else takes most of what is left.
    std::fs::write(fs.0.path().join("filler"), vec![1u8; (44 * CS) as usize]).unwrap();
    let mut kept = 0;
    for i in 16..64 {
        if put(&s, &f, i, Mode::Read) == Some(true) {
            kept += 1;
        }
    }
    let (cap, _) = s.pressure();
    assert!(cap < 32 * CS, "the capacity in force shrank to {cap}");
    assert!(
        kept > 0,
        "the cache goes on within what the filesystem gives"
    );
    assert!(s.stats.cache_write_errors.load(Relaxed) > 0);
    for i in 0..64 {
        if let Some(b) = s.read_chunk(&f, i) {
            assert!(b[..] == chunk(&f, i)[..], "chunk {i}");
        }
    }
}

#[test]
fn a_complete_file_from_an_earlier_run_is_never_punched() {
    let d = tempfile::tempdir().unwrap();
    let v = fv("m", 3 * CS);
    let name = {
        let s = store(d.path(), 100 * CS);
        let f = s.file(&v);
        for i in 0..3 {
            put(&s, &f, i, Mode::Read).unwrap();
        }
        d.path().join(super::disk::data_name(f.key))
    };
    // A process that outlived the earlier daemon still maps the file.
    let map = unsafe { memmap2::Mmap::map(&std::fs::File::open(&name).unwrap()).unwrap() };
    let want = map.to_vec();
    let s = store(d.path(), 3 * CS);
    let g = s.file(&fv("other", 3 * CS));
    for i in 0..3 {
        assert_eq!(put(&s, &g, i, Mode::Read), Some(true));
    }
    assert!(map[..] == want[..], "eviction changed a mapped file");
    assert_eq!(s.retired_bytes(), 3 * CS);
}

#[test]
fn eviction_leaves_no_file_open_that_nobody_holds() {
    let d = tempfile::tempdir().unwrap();
    let s = store(d.path(), 40 * CS);
    for n in 0..20 {
        let f = s.file(&fv(&format!("f{n}"), 2 * CS));
        put(&s, &f, 0, Mode::Read).unwrap();
        put(&s, &f, 1, Mode::Read).unwrap();
        s.read(&f, 1, 0..4).unwrap();
    }
    let g = s.file(&fv("g", 20 * CS));
    for i in 0..20 {
        assert_eq!(put(&s, &g, i, Mode::Read), Some(true));
    }
    drop(g);
    assert_eq!(fds_in(d.path()), 2, "only the dir and its lock stay open");
}

#[test]
fn files_removed_behind_the_cache_leave_its_accounting() {
    let d = tempfile::tempdir().unwrap();
    let s = store(d.path(), 10 * CS);
    let key = {
        let f = s.file(&fv("a", 2 * CS));
        put(&s, &f, 0, Mode::Read).unwrap();
        put(&s, &f, 1, Mode::Read).unwrap();
        f.key
    };
    std::fs::remove_file(d.path().join(super::disk::data_name(key))).unwrap();
    let f = s.file(&fv("a", 2 * CS));
    assert!(s.read_chunk(&f, 0).is_none());
    assert_eq!(s.usage(), (0, 0));
    assert_eq!(put(&s, &f, 0, Mode::Read), Some(true), "cached again");
    assert_eq!(&s.read_chunk(&f, 0).unwrap()[..], &chunk(&f, 0)[..]);
}

#[test]
fn a_mapped_read_pins_its_chunk_until_dropped() {
    // Hits are mapped only from tmpfs.
    let d = tempfile::tempdir_in("/dev/shm").unwrap();
    assert!(on_tmpfs(d.path()), "/dev/shm is not tmpfs here");
    let s = store(d.path(), 2 * CS);
    let f = s.file(&fv("a", 2 * CS));
    for i in 0..2 {
        assert_eq!(put(&s, &f, i, Mode::Read), Some(true));
    }
    // An odd offset: the mapping starts inside a page.
    let mapped = s.read_mapped(&f, 0, 5..CS - 1).unwrap();
    assert_eq!(&mapped[..], &chunk(&f, 0)[5..CS as usize - 1]);
    let _ = s.read(&f, 1, 0..1).unwrap();
    // Chunk 0 is the least recently used, but mapped: room is made from
    // chunk 1 instead, and chunk 0's bytes stay what they were.
    let g = s.file(&fv("b", CS));
    assert_eq!(put(&s, &g, 0, Mode::Read), Some(true));
    assert!(s.read(&f, 1, 0..1).is_none(), "chunk 1 was evicted");
    assert_eq!(&mapped[..], &chunk(&f, 0)[5..CS as usize - 1]);
    let h = s.file(&fv("c", CS));
    assert_eq!(put(&s, &h, 0, Mode::Read), Some(true));
    assert!(
        s.read(&g, 0, 0..1).is_none(),
        "b's chunk went, not the mapped one"
    );
    assert_eq!(&mapped[..], &chunk(&f, 0)[5..CS as usize - 1]);
    drop(mapped);
    // Unpinned, chunk 0 is the least recently used and goes first.
    let k = s.file(&fv("d", CS));
    assert_eq!(put(&s, &k, 0, Mode::Read), Some(true));
    assert!(s.read(&f, 0, 0..1).is_none(), "chunk 0 was evicted");
    assert_eq!(&s.read(&h, 0, 0..CS).unwrap()[..], &chunk(&h, 0)[..]);
}

#[test]
fn a_liars_chunk_is_dropped_even_from_a_file_pinned_whole() {
    let d = tempfile::tempdir().unwrap();
    let s = store(d.path(), 8 * CS);
    let f = s.file(&fv("a", 2 * CS));
    put(&s, &f, 0, Mode::Read).unwrap();
    put(&s, &f, 1, Mode::Read).unwrap();
    assert!(s.discard(f.key, 0), "punched");
    assert!(!s.contains(&f, 0) && s.contains(&f, 1));
    assert!(!s.discard(f.key, 0), "no longer cached");
    assert_eq!(s.usage(), (CS, 1));

    // Open through passthrough: its readers keep the bytes they map, the
    // file is retired, and what is fetched again is pinned with it.
    put(&s, &f, 0, Mode::Read).unwrap();
    let pin = s.pin_whole(&f).unwrap();
    // SAFETY: the store promises the file's bytes never change under a map.
    let map = unsafe { memmap2::Mmap::map(&pin.file).unwrap() };
    assert!(s.discard(f.key, 1));
    assert!(!s.contains(&f, 0) && !s.contains(&f, 1));
    assert_eq!(&map[..CS as usize], &chunk(&f, 0)[..]);
    assert_eq!(s.retired_bytes(), 2 * CS);
    put(&s, &f, 0, Mode::Read).unwrap();
    drop(pin);
    drop(map);
    assert_eq!(s.usage(), (CS, 1));
    // Unpinned as much as was pinned: prefetch has its window (half the
    // cache) again, which a miscount would have shrunk to nothing.
    let g = s.file(&fv("b", 4 * CS));
    for i in 0..4 {
        assert_eq!(put(&s, &g, i, Mode::Prefetch), Some(true));
    }
}

#[test]
fn a_chunk_discarded_while_mapped_keeps_the_mapped_bytes_and_its_new_copy_unpins() {
    let d = tempfile::tempdir_in("/dev/shm").unwrap();
    let s = store(d.path(), CS);
    let f = s.file(&fv("a", CS));
    assert_eq!(put(&s, &f, 0, Mode::Read), Some(true));
    let old = s.read_mapped(&f, 0, 0..CS).unwrap();
    // Pinned by the mapping: the whole file is retired, not punched.
    assert!(s.discard(f.key, 0));
    assert!(!s.contains(&f, 0));
    assert_eq!(&old[..], &chunk(&f, 0)[..]);
    assert_eq!(put(&s, &f, 0, Mode::Read), Some(true), "cached again");
    let new = s.read_mapped(&f, 0, 0..CS).unwrap();
    // The old pin belongs to the retired generation: dropping it leaves
    // the new copy pinned by `new` alone.
    drop(old);
    let g = s.file(&fv("b", CS));
    assert_eq!(
        put(&s, &g, 0, Mode::Read),
        None,
        "a's chunk is still mapped"
    );
    assert_eq!(&new[..], &chunk(&f, 0)[..]);
    drop(new);
    assert_eq!(put(&s, &g, 0, Mode::Read), Some(true), "unpinned at last");
    assert!(!s.contains(&f, 0));
}

/// The one data file in cache dir `dir`.
fn data_file(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "data"))
        .unwrap()
}

/// Streams chunk `i` of `f` into the store in pieces of `sizes` (the rest
/// in one last piece).
fn stream(s: &Arc<ChunkStore>, f: &CacheFile, i: u64, sizes: &[usize]) -> std::io::Result<Bytes> {
    use crate::source::Sink;
    let Reserve::Room(r) = s.reserve(f, i, Mode::Read) else {
        panic!("room expected")
    };
    assert!(s.takes_streams(), "streams are taken on tmpfs");
    let mut w = s.writer(r).expect("a writer");
    let want = chunk(f, i);
    let mut at = 0;
    for &n in sizes.iter().chain([&usize::MAX]) {
        let end = at + n.min(want.len() - at);
        w.put(&want[at..end]);
        at = end;
    }
    s.commit_written(w)
}

#[test]
fn a_streamed_chunk_is_kept_checked_and_pinned_until_its_waiters_are_done() {
    let d = tempfile::tempdir_in("/dev/shm").unwrap();
    let s = store(d.path(), 2 * CS);
    let f = s.file(&fv("a", 2 * CS - 7));
    let got = stream(&s, &f, 1, &[1, 1000, 0, 2048]).unwrap();
    assert_eq!(&got[..], &chunk(&f, 1)[..]);
    assert!(s.contains(&f, 1));
    // Pinned while its waiters hold it: room is made from a newer chunk.
    let g = s.file(&fv("b", CS));
    assert_eq!(put(&s, &g, 0, Mode::Read), Some(true));
    let h = s.file(&fv("c", CS));
    assert_eq!(put(&s, &h, 0, Mode::Read), Some(true));
    assert!(
        s.contains(&f, 1) && !s.contains(&g, 0),
        "the streamed chunk is pinned"
    );
    assert_eq!(&got[..], &chunk(&f, 1)[..]);
    drop(got);
    assert_eq!(put(&s, &g, 0, Mode::Read), Some(true));
    assert!(!s.contains(&f, 1), "unpinned, the oldest goes first");
    // Its crc, summed piece by piece, is the whole chunk's: a restart
    // takes it back and checks it.
    let h = s.file(&fv("d", 2 * CS));
    assert_eq!(
        &stream(&s, &h, 0, &[4095, 1]).unwrap()[..],
        &chunk(&h, 0)[..]
    );
    drop((f, g, h, s));
    let s = store(d.path(), 2 * CS);
    let h = s.file(&fv("d", 2 * CS));
    assert_eq!(
        &s.read_chunk(&h, 0).expect("restored")[..],
        &chunk(&h, 0)[..]
    );
    assert_eq!(s.stats.crc_failures.load(Relaxed), 0);
}

#[test]
fn a_stream_cut_short_leaves_no_bytes_and_gives_its_room_back() {
    use crate::source::Sink;
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir_in("/dev/shm").unwrap();
    let s = store(d.path(), 4 * CS);
    let f = s.file(&fv("a", 4 * CS));
    assert_eq!(put(&s, &f, 0, Mode::Read), Some(true));
    let blocks = || std::fs::metadata(data_file(d.path())).unwrap().blocks();
    let before = blocks();
    // The source fails half way: the writer and the room are dropped.
    let Reserve::Room(r) = s.reserve(&f, 1, Mode::Read) else {
        panic!("room expected")
    };
    let mut w = s.writer(r).unwrap();
    w.put(&chunk(&f, 1)[..2000]);
    assert!(blocks() > before);
    drop(w);
    assert_eq!(blocks(), before, "the piece written is punched");
    assert_eq!(s.usage(), (CS, 1), "its room is given back");
    // A writer committed short is refused the same way.
    let Reserve::Room(r) = s.reserve(&f, 1, Mode::Read) else {
        panic!("room again")
    };
    let mut w = s.writer(r).unwrap();
    w.put(&chunk(&f, 1)[..CS as usize - 1]);
    assert!(s.commit_written(w).is_err());
    assert_eq!(blocks(), before);
    assert_eq!(s.usage(), (CS, 1));
    assert!(!s.contains(&f, 1));
    assert_eq!(&stream(&s, &f, 1, &[100]).unwrap()[..], &chunk(&f, 1)[..]);
}

#[test]
fn a_stream_into_a_full_filesystem_is_served_from_memory() {
    let fs = SmallFs::new(64 * CS);
    let dir = fs.0.path().join("cache");
    let s = store(&dir, 32 * CS);
    let f = s.file(&fv("a", 64 * CS));
    std::fs::write(fs.0.path().join("filler"), vec![1u8; (60 * CS) as usize]).unwrap();
    let mut served_uncached = 0;
    for i in 0..8 {
        let got = stream(&s, &f, i, &[CS as usize / 3, 10, CS as usize / 2]).unwrap();
        assert!(got[..] == chunk(&f, i)[..], "chunk {i}");
        if !s.contains(&f, i) {
            served_uncached += 1;
        }
        drop(got);
    }
    assert!(served_uncached > 0, "the filesystem never filled");
    assert!(s.stats.cache_write_errors.load(Relaxed) > 0);
    for i in 0..8 {
        if let Some(b) = s.read_chunk(&f, i) {
            assert!(b[..] == chunk(&f, i)[..], "chunk {i} as cached");
        }
    }
}

#[test]
fn off_tmpfs_a_chunk_is_joined_in_memory_not_streamed() {
    let d = tempfile::tempdir().unwrap();
    if on_tmpfs(d.path()) {
        return;
    }
    assert!(!store(d.path(), 2 * CS).takes_streams());
}

#[test]
fn pieces_written_before_the_filesystem_filled_are_taken_back_into_memory() {
    use crate::source::Sink;
    const BIG: u64 = 64 * 1024;
    let fs = SmallFs::new(8 * BIG);
    let dir = fs.0.path().join("cache");
    let s = ChunkStore::open(
        CacheConfig {
            dir: dir.clone(),
            capacity: 4 * BIG,
            chunk_size: BIG,
            source_id: "test".into(),
            prefetch_window: u64::MAX,
        },
        Arc::default(),
    )
    .unwrap();
    let f = s.file(&fv("a", 4 * BIG));
    let want: Vec<u8> = (0..BIG).map(|b| (b * 7 + 1) as u8).collect();
    let Reserve::Room(r) = s.reserve(&f, 0, Mode::Read) else {
        panic!("room expected")
    };
    let mut w = s.writer(r).unwrap();
    // A third of the chunk goes into the file; then someone else fills it.
    w.put(&want[..BIG as usize / 3]);
    let free = nix::sys::statvfs::statvfs(fs.0.path()).unwrap();
    let free = free.blocks_available() * free.fragment_size();
    std::fs::write(fs.0.path().join("filler"), vec![1u8; free as usize]).unwrap();
    w.put(&want[BIG as usize / 3..BIG as usize / 2]);
    w.put(&want[BIG as usize / 2..]);
    let got = s.commit_written(w).unwrap();
    assert!(got[..] == want[..], "the chunk is served whole");
    assert!(!s.contains(&f, 0), "and not kept");
    assert_eq!(s.stats.cache_write_errors.load(Relaxed), 1);
    assert_eq!(s.usage(), (0, 0), "its room is given back");
    std::fs::remove_file(fs.0.path().join("filler")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(data_file(&dir)).unwrap().blocks(),
        0,
        "nothing left in the file"
    );
}

#[test]
fn a_chunk_half_written_when_the_daemon_died_is_freed_on_restart() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir_in("/dev/shm").unwrap();
    let s = store(d.path(), 4 * CS);
    let f = s.file(&fv("a", 4 * CS));
    assert_eq!(put(&s, &f, 0, Mode::Read), Some(true));
    let data = data_file(d.path());
    drop(f);
    drop(s);
    // What a writer had put of chunk 2 when the daemon was killed: bytes
    // in the file, no index entry.
    let file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 3000], 2 * CS).unwrap();
    drop(file);
    assert_eq!(std::fs::metadata(&data).unwrap().blocks() * 512, 2 * CS);
    let s = store(d.path(), 4 * CS);
    assert_eq!(
        std::fs::metadata(data).unwrap().blocks() * 512,
        CS,
        "only the chunk the index holds keeps blocks"
    );
    assert_eq!(s.usage(), (CS, 1));
    let f = s.file(&fv("a", 4 * CS));
    assert_eq!(&s.read_chunk(&f, 0).unwrap()[..], &chunk(&f, 0)[..]);
}
