use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use opendal::{EntryMode, ErrorKind, Metadata, Operator};

use super::{DirEntry, FileVersion, ObjectMeta, Sink, Source};
use crate::{buf, Error, Result};

/// Every storage service (local or NAS directory, S3, OSS, GCS, Azure Blob)
/// through one OpenDAL operator.
pub struct OpendalSource {
    id: String,
    op: Operator,
    /// Whether ranged reads can carry If-Match on the ETag, so a replaced
    /// object fails the read instead of returning new bytes.
    if_match: bool,
    /// The service's own form of an ETag in If-Match: GCS's JSON API gives
    /// and compares them without quotes.
    quoted_if_match: bool,
    /// The root of a local or NAS directory, read with pread straight into
    /// a reused buffer: OpenDAL's fs service zero-fills a fresh buffer per
    /// read and hands it back in pieces, which costs more CPU than the copy.
    local_root: Option<PathBuf>,
    /// Whether a local source is read with O_DIRECT, until the filesystem
    /// refuses it once (EINVAL): see [`read_at`].
    direct: AtomicBool,
}

const ETAG: &str = "etag:";
const MTIME: &str = "mtime:";

/// The one notion of an object's version, from whatever a listing or a stat
/// gave: the ETag when there is one, else the version id, else mtime and
/// size. Listings and stats must agree, since peers, the warm-up service and
/// If-Match all compare what one node listed with what another stat'ed: a
/// versioned bucket's stat carries a version id that its listing lacks, so
/// the ETag, which both carry, comes first. It is kept in its strong quoted
/// form (`"abc"`), which If-Match wants; some listings (Azure) drop the
/// quotes that their stats keep.
fn version_of(
    is_dir: bool,
    etag: Option<&str>,
    version_id: Option<&str>,
    mtime: SystemTime,
    len: u64,
) -> String {
    // A weak ETag never passes a strong If-Match: such an object is
    // versioned by what follows, and checked by a stat after each read.
    let etag = etag
        .map(str::trim)
        .filter(|e| !e.starts_with("W/"))
        .map(|e| e.trim_matches('"'))
        .filter(|e| !e.is_empty());
    match (etag, version_id) {
        (Some(e), _) if !is_dir => format!("{ETAG}\"{e}\""),
        (_, Some(v)) if !is_dir && !v.is_empty() => format!("version:{v}"),
        _ => {
            let ns = mtime
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{MTIME}{ns}:{len}")
        }
    }
}

/// Bytes `range` of the file at `path`, short if it ends first. With
/// `direct`, a range of a MiB or more (a chunk) is read through O_DIRECT
/// into a 4 KiB-aligned part of a reused buffer: the bytes go from the
/// device (or the NAS client) straight into it, with no copy out of the
/// page cache and no page cache filled with a model this node keeps in its
/// own cache already (that was a quarter of the daemon's CPU in a cold
/// local load, and as much memory again as the model). A smaller piece (a
/// reader's, past a full cache) keeps the page cache and its readahead.
fn read_at(path: &Path, range: Range<u64>, direct: bool) -> std::io::Result<Bytes> {
    use std::os::unix::fs::OpenOptionsExt;
    const ALIGN: u64 = 4096;
    if range.start >= range.end {
        return Ok(Bytes::new());
    }
    let direct = direct && range.end - range.start >= 1 << 20;
    let (from, to) = if direct {
        let to = range.end.checked_next_multiple_of(ALIGN);
        (range.start / ALIGN * ALIGN, to.unwrap_or(u64::MAX))
    } else {
        (range.start, range.end)
    };
    let len = usize::try_from(to.saturating_sub(from))
        .ok()
        .filter(|&l| l <= isize::MAX as usize - ALIGN as usize)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "range too large"))?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)?;
    let mut buf = buf::take(if direct { len + ALIGN as usize } else { len });
    let pad = if direct {
        let at = buf.as_ptr() as usize;
        at.next_multiple_of(ALIGN as usize) - at
    } else {
        0
    };
    buf.resize(pad, 0);
    let block = if direct { ALIGN as usize } else { 1 };
    match buf::pread_blocks(&f, &mut buf, len, from, block) {
        // A file cut short: the version check or the length check after
        // the read says which.
        Err(e) if e.kind() != std::io::ErrorKind::UnexpectedEof => return Err(e),
        _ => {}
    }
    let end = (pad as u64 + (range.end - from)).min(buf.len() as u64) as usize;
    let start = (pad as u64 + (range.start - from)).min(end as u64) as usize;
    Ok(buf::freeze(buf).slice(start..end))
}

impl OpendalSource {
    pub fn new(id: impl Into<String>, op: Operator) -> Self {
        let if_match = op.info().capability().read_with_if_match;
        let quoted_if_match = op.info().scheme() != "gcs";
        let local_root = (op.info().scheme() == "fs").then(|| PathBuf::from(op.info().root()));
        OpendalSource {
            id: id.into(),
            op,
            if_match,
            quoted_if_match,
            local_root,
            direct: AtomicBool::new(true),
        }
    }

    /// Bytes `range` of a local file, read into a reused buffer ([`read_at`]).
    async fn read_local(
        &self,
        root: &Path,
        file: &FileVersion,
        range: Range<u64>,
    ) -> Result<Bytes> {
        let path = root.join(&file.path);
        let direct = self.direct.load(Ordering::Relaxed);
        let read =
            tokio::task::spawn_blocking(move || match read_at(&path, range.clone(), direct) {
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    read_at(&path, range, false).map(|b| (b, true))
                }
                r => r.map(|b| (b, false)),
            })
            .await
            .map_err(|e| Error::Cache(format!("read task failed: {e}")))?;
        match read {
            Ok((b, refused)) => {
                if refused && self.direct.swap(false, Ordering::Relaxed) {
                    tracing::info!(source = %self.id, "O_DIRECT refused here; reading through the page cache");
                }
                Ok(b)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::NotFound(file.path.clone()))
            }
            Err(e) => Err(Error::Source {
                path: format!("{}/{}", self.id.trim_end_matches('/'), file.path),
                msg: e.to_string(),
            }),
        }
    }

    /// Bytes `range` of an object, each piece of the body put in `sink` as
    /// it arrives.
    async fn read_remote(
        &self,
        file: &FileVersion,
        range: Range<u64>,
        etag: Option<&str>,
        sink: &mut (dyn Sink + Send),
    ) -> std::result::Result<(), opendal::Error> {
        let mut req = self.op.reader_with(&file.path);
        if let Some(etag) = etag {
            req = req.if_match(if self.quoted_if_match {
                etag
            } else {
                etag.trim_matches('"')
            });
        }
        let want = range.end - range.start;
        let mut stream = req.await?.into_stream(range).await?;
        while let Some(part) = stream.try_next().await? {
            for piece in part {
                // More than asked for is a short read's opposite; the length
                // check after the read reports it without taking the rest.
                let room = want.saturating_sub(sink.written()).min(piece.len() as u64);
                sink.put(&piece[..room as usize]);
                if room < piece.len() as u64 {
                    return Err(opendal::Error::new(
                        ErrorKind::Unexpected,
                        format!("the store sent more than the {want} bytes asked for"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What a read of `file` must still prove once its bytes are in: that
    /// they all came from that version (a stat after it, where the read
    /// itself was not conditional) and that they are all there.
    async fn check_read(
        &self,
        file: &FileVersion,
        conditional: bool,
        at: u64,
        want: u64,
        got: u64,
    ) -> Result<()> {
        if !conditional {
            let now = self.stat(&file.path).await.map_err(|e| match e {
                Error::NotFound(p) => Error::VersionChanged {
                    path: p,
                    expected: file.version.clone(),
                    found: "deleted".into(),
                },
                e => e,
            })?;
            if now.version != file.version {
                return Err(Error::VersionChanged {
                    path: file.path.clone(),
                    expected: file.version.clone(),
                    found: now.version,
                });
            }
        }
        if got != want {
            return Err(Error::Source {
                path: file.path.clone(),
                msg: format!("short read at {at}: {got} of {want} bytes"),
            });
        }
        Ok(())
    }

    fn remote_err(&self, file: &FileVersion, e: opendal::Error) -> Error {
        match e.kind() {
            ErrorKind::ConditionNotMatch => Error::VersionChanged {
                path: file.path.clone(),
                expected: file.version.clone(),
                found: "a newer ETag".into(),
            },
            _ => self.err(&file.path, e),
        }
    }

    fn meta(&self, m: &Metadata) -> ObjectMeta {
        let mtime = m
            .last_modified()
            .map(SystemTime::from)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let is_dir = m.mode() == EntryMode::DIR;
        let version = version_of(is_dir, m.etag(), m.version(), mtime, m.content_length());
        ObjectMeta {
            is_dir,
            size: if is_dir { 0 } else { m.content_length() },
            mtime,
            version,
        }
    }

    fn err(&self, path: &str, e: opendal::Error) -> Error {
        // Object stores answer in XML or JSON; a web page means --endpoint
        // names some other server, whatever status it gave.
        if e.to_string().to_lowercase().contains("text/html") {
            return Error::Source {
                path: self.id.clone(),
                msg: format!(
                    "the endpoint does not speak the {} API (it answered with a web page); check --endpoint",
                    service_name(&self.id)
                ),
            };
        }
        match e.kind() {
            // The root itself missing is the bucket missing (GCS answers a
            // plain 404 where S3 names NoSuchBucket).
            ErrorKind::NotFound if path.is_empty() => Error::Source {
                path: self.id.clone(),
                msg: "the bucket does not exist; check the name in the URL and the endpoint".into(),
            },
            ErrorKind::NotFound if !e.to_string().contains("NoSuchBucket") => {
                Error::NotFound(path.to_string())
            }
            _ => Error::Source {
                path: format!("{}/{}", self.id.trim_end_matches('/'), path),
                msg: describe(&self.id, &e),
            },
        }
    }
}

fn service_name(url: &str) -> &'static str {
    match url.split_once("://").map(|s| s.0) {
        Some("oss") => "OSS",
        Some("gs" | "gcs") => "Google Cloud Storage",
        Some("azblob") => "Azure Blob",
        _ => "S3",
    }
}

/// Where the service of `url` takes its credentials from, in its own terms.
fn credentials(url: &str) -> &'static str {
    match url.split_once("://").map(|s| s.0) {
        Some("oss") => "ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET (or OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET, a RAM role, or the ECS instance role)",
        Some("gs" | "gcs") => "GOOGLE_APPLICATION_CREDENTIALS to a service account key file (or run with the VM's service account)",
        Some("azblob") => "AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY (or AZURE_STORAGE_SAS_TOKEN)",
        _ => "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, a web identity, or an instance role)",
    }
}

/// One line a user can act on, from OpenDAL's error and its causes, for a
/// source at `url`.
pub fn describe(url: &str, e: &opendal::Error) -> String {
    let mut causes = vec![];
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        causes.push(c.to_string());
        cur = c.source();
    }
    let text = e.to_string();
    let all = format!("{text} {}", causes.join(" ")).to_lowercase();
    let root = causes.last().cloned().unwrap_or_default();
    let code = |c: &str| all.contains(&c.to_lowercase());
    let line = if code("NoSuchBucket") {
        "the bucket does not exist; check the name in the URL and the endpoint".to_string()
    } else if code("signing credential") {
        format!("no credentials found; set {}", credentials(url))
    } else if e.kind() == ErrorKind::PermissionDenied
        || code("AccessDenied")
        || code("InvalidAccessKeyId")
    {
        format!("access denied; check the credentials: {}", credentials(url))
    } else if [
        "certificate",
        "tls",
        "ssl",
        "handshake",
        "invalidcontenttype",
        "corrupt message",
    ]
    .iter()
    .any(|w| all.contains(w))
    {
        format!("TLS failure: {root}; check the endpoint's scheme (http/https) and its certificate")
    } else if code("error sending request") || code("connection refused") || code("dns error") {
        format!("cannot connect to the endpoint: {root}")
    } else if code("timeout") || code("timed out") {
        "the endpoint did not answer within --request-timeout; check the endpoint and the network"
            .to_string()
    } else if e.kind() == ErrorKind::RateLimited || code("SlowDown") {
        format!("throttled by the store after retries: {text}")
    } else {
        format!(
            "{} ({})",
            e.kind(),
            if root.is_empty() { text } else { root }
        )
    };
    line.replace('\n', " ")
}

#[async_trait]
impl Source for OpendalSource {
    fn id(&self) -> &str {
        &self.id
    }

    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let entries = self.op.list(&prefix).await.map_err(|e| self.err(dir, e))?;
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let name = entry.name().trim_end_matches('/');
            if name.is_empty() || entry.path() == prefix {
                continue;
            }
            let path = super::join(dir, name);
            let m = entry.metadata();
            // Listings of a local directory carry only the entry kind; object
            // stores give size and ETag with the listing and need no extra call.
            let meta = if m.mode() == EntryMode::FILE && m.last_modified().is_none() {
                match self.stat(&path).await {
                    Ok(meta) => meta,
                    Err(Error::NotFound(_)) => continue,
                    Err(e) => return Err(e),
                }
            } else {
                self.meta(m)
            };
            out.push(DirEntry {
                name: name.to_string(),
                meta,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn stat(&self, path: &str) -> Result<ObjectMeta> {
        if path.is_empty() {
            let m = self.op.stat("/").await.map_err(|e| self.err(path, e))?;
            return Ok(ObjectMeta {
                is_dir: true,
                ..self.meta(&m)
            });
        }
        match self.op.stat(path).await {
            Ok(m) => Ok(self.meta(&m)),
            // Object stores have no directory objects: a prefix is a directory.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let m = self
                    .op
                    .stat(&format!("{path}/"))
                    .await
                    .map_err(|e| self.err(path, e))?;
                Ok(ObjectMeta {
                    is_dir: true,
                    ..self.meta(&m)
                })
            }
            Err(e) => Err(self.err(path, e)),
        }
    }

    async fn read(&self, file: &FileVersion, range: Range<u64>) -> Result<Bytes> {
        let want = range.end - range.start;
        if let Some(root) = &self.local_root {
            let b = self.read_local(root, file, range.clone()).await?;
            self.check_read(file, false, range.start, want, b.len() as u64)
                .await?;
            return Ok(b);
        }
        let mut sink = Joined(buf::take(want as usize));
        self.read_to(file, range, &mut sink).await?;
        Ok(buf::freeze(sink.0))
    }

    fn streams(&self) -> bool {
        self.local_root.is_none()
    }

    async fn read_to(
        &self,
        file: &FileVersion,
        range: Range<u64>,
        sink: &mut (dyn Sink + Send),
    ) -> Result<()> {
        let want = range.end - range.start;
        let at = range.start;
        let etag = file.version.strip_prefix(ETAG).filter(|_| self.if_match);
        match &self.local_root {
            Some(root) => sink.put(&self.read_local(root, file, range).await?),
            None => self
                .read_remote(file, range, etag, sink)
                .await
                .map_err(|e| self.remote_err(file, e))?,
        }
        self.check_read(file, etag.is_some(), at, want, sink.written())
            .await
    }
}

/// A body joined in a reused buffer.
struct Joined(Vec<u8>);

impl Sink for Joined {
    fn put(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn written(&self) -> u64 {
        self.0.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_and_a_stat_of_a_versioned_object_agree() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        // S3 ListObjectsV2: the ETag, no version id.
        let listed = version_of(false, Some("\"9b2cf535f27731c9\""), None, t, 10);
        // HeadObject on a versioned bucket: the same ETag and a version id.
        let stated = version_of(
            false,
            Some("\"9b2cf535f27731c9\""),
            Some("3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"),
            t,
            10,
        );
        assert_eq!(listed, stated);
        assert_eq!(listed, "etag:\"9b2cf535f27731c9\"");
        // Azure lists the ETag unquoted and quotes it on a stat.
        assert_eq!(
            version_of(false, Some("0x8DC1A2B3C4D5E6F"), None, t, 10),
            version_of(
                false,
                Some("\"0x8DC1A2B3C4D5E6F\""),
                Some("2024-01-01"),
                t,
                10
            )
        );
        // The ETag is what If-Match is sent with.
        assert_eq!(listed.strip_prefix(ETAG), Some("\"9b2cf535f27731c9\""));
        // A weak ETag is no version for If-Match: mtime and size instead.
        assert_eq!(
            version_of(false, Some("W/\"9b2c\""), None, t, 10),
            "mtime:1700000000000000000:10"
        );
        // No ETag at all: the version id, then mtime and size.
        assert_eq!(version_of(false, None, Some("v1"), t, 10), "version:v1");
        assert_eq!(
            version_of(false, Some(""), None, t, 10),
            "mtime:1700000000000000000:10"
        );
        assert!(version_of(true, Some("\"x\""), Some("v"), t, 0).starts_with(MTIME));
    }

    /// Pages of `path` in the page cache.
    fn resident(path: &Path) -> usize {
        let f = std::fs::File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        // SAFETY: a private read-only mapping of a file we made, only
        // passed to mincore, which reads no byte of it.
        let map = unsafe { memmap2::Mmap::map(&f).unwrap() };
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: `vec` has a byte per page of the mapping.
        let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    /// O_DIRECT reads of ranges that start and end off block boundaries,
    /// at and past the end of files whose size is and is not a block
    /// multiple, give the same bytes as buffered reads, and (on a disk)
    /// leave the page cache empty: O_DIRECT was used, not silently dropped.
    /// (Ranges under a MiB are read buffered, so all here are larger.)
    #[test]
    fn direct_reads_of_unaligned_ranges_match_buffered_ones() {
        use std::os::fd::AsRawFd;
        const M: u64 = 1 << 20;
        for size in [3 * M + 1234, 2 * M] {
            let d = tempfile::tempdir_in("/var/tmp").unwrap();
            let path = d.path().join("f");
            let data: Vec<u8> = (0..size as u32).map(|i| (i * 7 + i / 251) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            let f = std::fs::File::open(&path).unwrap();
            f.sync_all().unwrap();
            // SAFETY: advice on a descriptor we own.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            let n = size;
            let ranges = [
                0..n,
                0..M,
                1..M + 4095,
                4095..2 * M + 1,
                M - 100..n,
                n - M + 7..n + 5000,
                n - 10..n + 2 * M,
                n..n + 2 * M,
                n + 5000..n + 5000 + 2 * M,
                100..100,
            ];
            for range in ranges.clone() {
                let want = &data[(range.start.min(n) as usize)..(range.end.min(n) as usize)];
                let got = read_at(&path, range.clone(), true).unwrap();
                assert_eq!(&got[..], want, "{size} {range:?} direct");
            }
            // On tmpfs a file's bytes are its page cache, O_DIRECT or not.
            if !crate::cache::on_tmpfs(d.path()) {
                assert_eq!(resident(&path), 0, "O_DIRECT filled the page cache");
            }
            for range in ranges {
                let want = &data[(range.start.min(n) as usize)..(range.end.min(n) as usize)];
                let got = read_at(&path, range.clone(), false).unwrap();
                assert_eq!(&got[..], want, "{size} {range:?} buffered");
            }
            assert!(resident(&path) > 0, "the check above can fail");
        }
    }
}
