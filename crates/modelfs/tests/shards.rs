//! Prefetch that reaches the next shard of a model while a loader reads the
//! one before, as loaders read shards one after another.
mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::hung::mount_beside_hung_peer;
use common::*;

const MIB: usize = 1 << 20;

/// Reads `range` of the mounted file; checks it against `want`.
fn read_exactly(f: &File, want: &[u8], range: std::ops::Range<usize>) {
    let mut buf = vec![0u8; range.len()];
    f.read_exact_at(&mut buf, range.start as u64).unwrap();
    assert!(buf == want[range.clone()], "bytes {range:?} differ");
}

fn shard(k: usize) -> String {
    format!("model-{k:05}-of-00003.safetensors")
}

/// Three 16 MiB shards in the source; their bytes.
fn three_shards(w: &Work, seed: u64) -> Vec<Vec<u8>> {
    (1..=3)
        .map(|k| write_file(&w.src().join(shard(k)), 16 * MIB, seed + k as u64))
        .collect()
}

/// Waits until the origin has sent `bytes` in all, 30 s at most.
fn origin_reaches(m: &Mount, bytes: usize) {
    wait_until(
        &format!("{bytes} bytes from the origin"),
        Duration::from_secs(30),
        || m.stat_u64("bytes_from_source") == bytes as u64,
    )
}

/// Loaders read a sharded model one shard after another: while one is open
/// and all cached, the next is prefetched (one ahead, no further), so it is
/// all in the cache when it is opened, and no byte comes twice.
#[test]
fn the_next_shard_is_prefetched_while_the_one_before_is_open() {
    let w = Work::new();
    let want = three_shards(&w, 500);
    let m = w.mount(&["--chunk-size", "1MiB"]);
    let origin = |bytes: usize| origin_reaches(&m, bytes);
    let first = File::open(m.path(&shard(1))).unwrap();
    read_exactly(&first, &want[0], 0..16 * MIB);
    origin(32 * MIB);
    // One ahead: the third is left for when the second is open.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(m.stat_u64("bytes_from_source"), 32 * MIB as u64);
    let (hits, passthrough) = (
        m.stat_u64("bytes_from_cache"),
        m.stat_u64("passthrough_opens"),
    );
    let second = File::open(m.path(&shard(2))).unwrap();
    drop(first);
    read_exactly(&second, &want[1], 0..16 * MIB);
    // All cached at its open: the kernel reads the cache file itself
    // (passthrough), or the daemon answers from the cache.
    assert!(
        m.stat_u64("passthrough_opens") == passthrough + 1
            || m.stat_u64("bytes_from_cache") - hits == 16 * MIB as u64,
        "the second shard came from the cache: {}",
        m.stats()
    );
    origin(48 * MIB);
    drop(second);
    let third = File::open(m.path(&shard(3))).unwrap();
    read_exactly(&third, &want[2], 0..16 * MIB);
    assert_eq!(m.stat_u64("bytes_from_source"), 48 * MIB as u64);
}

/// The same load through a cache that holds a shard and a half: what is
/// prefetched ahead never pushes out what a reader has not read, and the
/// origin sends each byte once more at most for a chunk a reader evicted.
#[test]
fn shards_prefetched_ahead_through_a_small_cache_cost_no_storm() {
    let w = Work::new();
    let want = three_shards(&w, 600);
    let m = w.mount(&["--chunk-size", "1MiB", "--cache-size", "24MiB"]);
    for (k, want) in want.iter().enumerate() {
        let f = File::open(m.path(&shard(k + 1))).unwrap();
        for at in (0..16 * MIB).step_by(MIB) {
            read_exactly(&f, want, at..at + MIB);
            // A reader that pauses now and then.
            if at % (4 * MIB) == 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let s = m.stats();
    let stat = |k: &str| s[k].as_u64().unwrap();
    assert!(stat("cache_bytes_used") <= 24 * MIB as u64, "{s}");
    assert!(
        stat("bytes_from_source") <= (48 + stat("chunks_evicted")) * MIB as u64,
        "{s}"
    );
    assert_eq!(stat("read_errors"), 0, "{s}");
}

/// Prefetch ahead of any reader takes half the window at most, and when
/// the shard before is closed with the next never opened (a load that
/// stopped early), what it fetched leaves the window: other files'
/// prefetch is not held back by chunks nobody will read.
#[test]
fn a_next_shard_nobody_opens_takes_half_the_window_then_none_of_it() {
    let w = Work::new();
    let want = three_shards(&w, 700);
    let m = w.mount(&["--chunk-size", "1MiB", "--prefetch-window", "16MiB"]);
    let first = File::open(m.path(&shard(1))).unwrap();
    read_exactly(&first, &want[0], 0..16 * MIB);
    wait_until("half the window ahead", Duration::from_secs(30), || {
        m.stat_u64("bytes_from_source") == 24 * MIB as u64
    });
    std::thread::sleep(Duration::from_millis(500));
    let s = m.stats();
    assert_eq!(s["bytes_from_source"], 24 * MIB as u64, "{s}");
    assert_eq!(s["prefetch_bytes_unread"], 8 * MIB as u64, "{s}");
    drop(first);
    // A loader closes one shard before it opens the next: the next keeps
    // its place in the window for a few seconds.
    assert_eq!(m.stat_u64("prefetch_bytes_unread"), 8 * MIB as u64);
    wait_until("the window to be free", Duration::from_secs(30), || {
        m.stat_u64("prefetch_bytes_unread") == 0
    });
    // Still cached: opening the second shard fetches only its other half
    // (and, while it is open, half a window of the third: 8 + 8 MiB more;
    // 16 + 8 had it been fetched again whole).
    let second = File::open(m.path(&shard(2))).unwrap();
    read_exactly(&second, &want[1], 0..16 * MIB);
    wait_until(
        "the third shard's half window",
        Duration::from_secs(30),
        || m.stat_u64("bytes_from_source") >= 40 * MIB as u64,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        m.stat_u64("bytes_from_source"),
        40 * MIB as u64,
        "{}",
        m.stats()
    );
}

/// The next shard is prefetched in the version an open would see now, not
/// the one a listing cached before it was replaced.
#[test]
fn a_next_shard_replaced_after_its_listing_is_prefetched_as_it_is_now() {
    let w = Work::new();
    let first = write_file(&w.src().join(shard(1)), 8 * MIB, 801);
    write_file(&w.src().join(shard(2)), 8 * MIB, 802);
    let m = w.mount(&["--chunk-size", "1MiB"]);
    // The listing now holds the second shard's first version.
    assert_eq!(std::fs::read_dir(&m.mp).unwrap().count(), 2);
    std::thread::sleep(Duration::from_millis(20));
    let second = write_file(&w.src().join(shard(2)), 8 * MIB, 803);
    let f = File::open(m.path(&shard(1))).unwrap();
    read_exactly(&f, &first, 0..8 * MIB);
    wait_until("the second shard ahead", Duration::from_secs(30), || {
        m.stat_u64("bytes_from_source") == 16 * MIB as u64
    });
    assert_eq!(m.stat_u64("version_changes"), 0, "{}", m.stats());
    let g = File::open(m.path(&shard(2))).unwrap();
    read_exactly(&g, &second, 0..8 * MIB);
    assert_eq!(
        m.stat_u64("bytes_from_source"),
        16 * MIB as u64,
        "{}",
        m.stats()
    );
}

/// In a peer group with a member that hangs, the next shard's chunks that
/// member owns cost the ahead job one peer timeout, then come from the
/// origin: the load goes on, and no byte comes twice.
#[test]
fn next_shard_prefetch_past_a_hung_peer_fetches_each_byte_once() {
    let w = Work::new();
    let want = three_shards(&w, 900);
    let (hung, m) =
        mount_beside_hung_peer(&w, "127.0.0.71", "127.0.0.70", &["--chunk-size", "1MiB"]);
    // An ask of the hung member costs the peer timeout and the origin's
    // budget (2 + 2 s) until it is backed off: far less than this bound.
    let origin = |bytes: usize| origin_reaches(&m, bytes);
    let first = File::open(m.path(&shard(1))).unwrap();
    read_exactly(&first, &want[0], 0..16 * MIB);
    origin(32 * MIB);
    // The reads above met the hung member and backed it off (for 10 s,
    // `backoff_for` in the engine's peer membership): wait that out, so
    // that the next ahead job asks it.
    std::thread::sleep(Duration::from_secs(11));
    let asked = hung.seen().len();
    let second = File::open(m.path(&shard(2))).unwrap();
    drop(first);
    read_exactly(&second, &want[1], 0..16 * MIB);
    origin(48 * MIB);
    assert!(
        hung.seen()[asked..]
            .iter()
            .any(|(_, line)| line.contains("model-00003-of-00003")),
        "the ahead job never asked the hung member: {:?}",
        hung.seen()
    );
    drop(second);
    let third = File::open(m.path(&shard(3))).unwrap();
    read_exactly(&third, &want[2], 0..16 * MIB);
    let s = m.stats();
    assert_eq!(s["bytes_from_source"], 48 * MIB as u64, "{s}");
    assert!(
        s["peers"][&hung.addr]["errors"].as_u64().unwrap() >= 2,
        "{s}"
    );
    assert_eq!(s["read_errors"], 0, "{s}");
}

/// The next shard is prefetched into a cache whose filesystem fills under
/// it (something else takes the space; a mount whose --cache-size does not
/// fit the filesystem's free space is refused, so the budget is larger
/// than what the filesystem can give only after the mount): the ahead job
/// meets ENOSPC, the cache shrinks to what it holds, and the load goes on
/// with every byte right, no read failing, and no storm of the origin
/// (each chunk whose write failed was fetched once for nothing).
#[test]
fn next_shard_prefetch_on_a_cache_filesystem_that_fills() {
    let w = Work::new();
    three_shards(&w, 1000);
    let fs = Tmpfs::new(48 * MIB);
    let cache = fs.path().join("cache");
    let m = Mount::new(
        w.src().to_str().unwrap(),
        &w.mnt(),
        &cache,
        &[
            "--chunk-size",
            "1MiB",
            "--cache-size",
            "40MiB",
            "--prefetch-concurrency",
            "2",
        ],
        &[],
    );
    // 20 MiB stay free for a 40 MiB budget: the first shard fits, and the
    // second, prefetched ahead in half the window (10 MiB), does not.
    fs.fill_leaving(20 * MIB);
    // The shards are read by `cmp` within a bound (a wait for room that
    // never ends fails the test), while this process holds each open as a
    // loader does.
    let read = |k: usize| {
        cmp_within(
            &w.src().join(shard(k)),
            &m.path(&shard(k)),
            Duration::from_secs(60),
        )
    };
    let first = File::open(m.path(&shard(1))).unwrap();
    read(1);
    wait_until(
        "the ahead job to fill the filesystem",
        Duration::from_secs(30),
        || m.stat_u64("cache_write_errors") > 0,
    );
    let second = File::open(m.path(&shard(2))).unwrap();
    drop(first);
    read(2);
    drop(second);
    let third = File::open(m.path(&shard(3))).unwrap();
    read(3);
    drop(third);
    // The daemon still answers, and no read failed.
    let s = m.stats();
    let stat = |k: &str| s[k].as_u64().unwrap();
    assert_eq!(stat("read_errors"), 0, "{s}");
    assert!(
        stat("cache_bytes_capacity_effective") < stat("cache_bytes_capacity"),
        "the cache did not shrink to its filesystem: {s}"
    );
    // A write fails only while the filesystem is full: for the fetches in
    // flight when it filled (two prefetch permits and a reader's miss), as
    // the cache then shrinks to what it holds; it grows back (after 10 s)
    // only to what the filesystem has free less a chunk, which a fetch in
    // flight then may still miss. A chunk whose write failed was fetched
    // once for nothing (a reader's is served all the same): the origin
    // sends the shards once, plus a chunk per failed write, plus one.
    let errors = stat("cache_write_errors");
    assert!(
        errors <= 6,
        "writes kept failing on the full filesystem: {s}"
    );
    let slack = (errors + 1) * MIB as u64;
    assert!(
        stat("bytes_from_source") <= 48 * MIB as u64 + slack,
        "{} bytes from the origin for 48 MiB of shards: {s}",
        stat("bytes_from_source")
    );
}
